"""Checkpoints: our own format, and import/export of the authors' (THUDM/GLM) checkpoints.

Our format is a directory holding ``model.safetensors`` (the weights), ``config.json`` (the
``GLMConfig`` fields), possibly ``tokenizer.json`` (the model's tokenizer, a ``GLMTokenizer.save``
file, as ``glm-ext convert --tokenizer-files`` writes it) and ``manifest.json`` (the size and SHA-256
of the other files, and metadata such as the fingerprint of the tokenizer the model was trained with;
:func:`glm_ext.files.write_manifest`), written atomically: into a temporary directory next to the
target, fsynced, then renamed into place, so a reader finds either the old complete checkpoint or
the new one. Loading checks the files against the manifest (so flipped bytes, a truncated file or an
edited ``config.json`` are refused, naming the file) and the weights' shapes against the config.
Checkpoints written before manifests existed load unchecked.

``GLMModel``'s parameter names are the authors' keys (GLM_SPEC 3), so the translation to and from
their layout only deals with the containers around the keys:

* the authors' training checkpoints (``mp_rank_00_model_states.pt``) hold the weights under
  ``"module"``; their directories may name the iteration to load in
  ``latest_checkpointed_iteration.txt`` (``<dir>/<tag>/mp_rank_00_model_states.pt``);
* the Hugging Face port (``pytorch_model.bin``, possibly sharded with
  ``pytorch_model.bin.index.json``) prefixes every key with ``glm.``;
* the output projection is tied to ``word_embeddings.weight``. A copy of it under
  ``lm_head.weight`` (as some ports carry) is accepted if it equals the word embedding and
  dropped; a different one is an error, since the model cannot represent untied weights.

The authors' files are read with ``torch.load(weights_only=True)``: a checkpoint that pickles other
objects (e.g. numpy RNG states) is refused with an explanation instead of being unpickled.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from glm_ext.files import (
    MANIFEST_FILE,
    CorruptFileError,
    read_manifest,
    staged_directory,
    verify_manifest,
    write_file_atomically,
    write_manifest,
)
from glm_ext.model import GLMConfig, GLMModel

if TYPE_CHECKING:
    from glm_ext.tokenizer import GLMTokenizer

__all__ = [
    "AUTHORS_WEIGHTS_FILE",
    "CONFIG_FILE",
    "TOKENIZER_FILE",
    "TOKENIZER_SHA256",
    "WEIGHTS_FILE",
    "check_state_dict",
    "checkpoint_metadata",
    "export_authors_state_dict",
    "import_authors_checkpoint",
    "is_checkpoint",
    "load_authors_state_dict",
    "load_checkpoint",
    "save_authors_checkpoint",
    "save_checkpoint",
]

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_SHA256 = "tokenizer_sha256"  # the metadata entry naming the tokenizer the model goes with
AUTHORS_WEIGHTS_FILE = "mp_rank_00_model_states.pt"
AUTHORS_TRACKER_FILE = "latest_checkpointed_iteration.txt"
HF_WEIGHTS_FILE = "pytorch_model.bin"
HF_INDEX_FILE = "pytorch_model.bin.index.json"
HF_PREFIX = "glm."
TIED_OUTPUT_KEYS = ("lm_head.weight",)
WORD_EMBEDDINGS_KEY = "word_embeddings.weight"

StateDict = dict[str, torch.Tensor]


# --------------------------------------------------------------------------------------------
# Validation


def _expected_shapes(config: GLMConfig) -> dict[str, torch.Size]:
    """Key -> shape of a model of ``config`` (built on the meta device: no memory, no init cost)."""
    with torch.device("meta"):
        model = GLMModel(config)
    return {key: value.shape for key, value in model.state_dict().items()}


def _listing(title: str, items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
    return f"\n  {title} ({len(items)}): {shown}"


def check_state_dict(state: Mapping[str, Any], config: GLMConfig) -> None:
    """Raises ValueError naming every missing, unexpected and mis-shaped key (and non-tensors)."""
    expected = _expected_shapes(config)
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    not_tensors = [key for key in state if key in expected and not isinstance(state[key], torch.Tensor)]
    misshaped = [
        f"{key} {list(state[key].shape)} (expected {list(shape)})"
        for key, shape in expected.items()
        if isinstance(state.get(key), torch.Tensor) and state[key].shape != shape
    ]
    if missing or unexpected or not_tensors or misshaped:
        message = f"the weights do not match {config}:"
        for title, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("values that are not tensors", not_tensors),
            ("mis-shaped keys", misshaped),
        ):
            if items:
                message += _listing(title, items)
        raise ValueError(message)


def _model_from_state(state: StateDict, config: GLMConfig, model_options: Mapping[str, Any]) -> GLMModel:
    """A model that adopts the tensors of ``state`` (no copy; their dtype and device are kept)."""
    check_state_dict(state, config)
    with torch.device("meta"):
        model = GLMModel(config, **model_options)
    model.load_state_dict(state, assign=True)
    return model


# --------------------------------------------------------------------------------------------
# Our format


def _standalone(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor that owns its storage (safetensors refuses views of shared memory)."""
    tensor = tensor.detach().to("cpu").contiguous()
    return tensor if tensor.untyped_storage().nbytes() == tensor.nbytes else tensor.clone()


def is_checkpoint(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a checkpoint in our format."""
    directory = Path(directory)
    return (directory / WEIGHTS_FILE).is_file() and (directory / CONFIG_FILE).is_file()


def _check_replaceable(target: Path) -> None:
    """Only a previous checkpoint (or an empty directory) may be replaced, never other data."""
    if not target.exists() and not target.is_symlink():
        return
    if target.is_symlink() or not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a plain directory; refusing to replace it")
    own = (WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE, MANIFEST_FILE)
    foreign = sorted(p.name for p in target.iterdir() if p.name not in own)
    if foreign:
        raise FileExistsError(
            f"{target} exists and holds files other than a glm_ext checkpoint ({', '.join(foreign)}); "
            "refusing to replace it"
        )


def _config_and_state(model_or_state: GLMModel | Mapping[str, torch.Tensor], config: GLMConfig | None):
    if isinstance(model_or_state, GLMModel):
        if config is not None and config != model_or_state.config:
            raise ValueError(f"config {config} differs from the model's {model_or_state.config}")
        return model_or_state.config, model_or_state.state_dict()
    if config is None:
        raise ValueError("saving a state dict needs its config (config=GLMConfig(...))")
    return config, dict(model_or_state)


def save_checkpoint(
    model_or_state: GLMModel | Mapping[str, torch.Tensor],
    directory: str | os.PathLike,
    *,
    config: GLMConfig | None = None,
    tokenizer: GLMTokenizer | None = None,
    overwrite: bool = False,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Writes ``directory/model.safetensors``, ``config.json`` (and ``tokenizer`` as
    ``tokenizer.json``) and ``manifest.json`` atomically.

    ``model_or_state`` is a ``GLMModel`` or a state dict in our (= the authors') keys, then with
    its ``config``. The weights are checked against the config before anything is written. An
    existing checkpoint at ``directory`` is replaced only with ``overwrite=True``, and only once the
    new one is complete; any other existing content is never touched (FileExistsError).
    ``metadata`` (JSON values) goes into the manifest (:func:`checkpoint_metadata`); its
    ``tokenizer_sha256`` names the tokenizer the model goes with (set from ``tokenizer`` when given).
    Returns the directory.
    """
    config, state = _config_and_state(model_or_state, config)
    check_state_dict(state, config)
    target = Path(directory).absolute()
    _check_replaceable(target)
    if is_checkpoint(target) and not overwrite:
        raise FileExistsError(f"{target} already holds a checkpoint; pass overwrite=True (--overwrite) to replace it")
    with staged_directory(target) as staging:
        save_file({key: _standalone(value) for key, value in state.items()}, staging / WEIGHTS_FILE,
                  metadata={"format": "pt"})
        (staging / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")
        names = [WEIGHTS_FILE, CONFIG_FILE]
        metadata = dict(metadata or {})
        if tokenizer is not None:
            tokenizer.save(staging / TOKENIZER_FILE)
            names.append(TOKENIZER_FILE)
            metadata[TOKENIZER_SHA256] = tokenizer.sha256
        write_manifest(staging, names, metadata)
    return target


def _read_config(path: Path) -> GLMConfig:
    try:
        return GLMConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, TypeError, AttributeError) as exc:  # not JSON, not an object, unknown or bad fields
        raise CorruptFileError(f"{path} is not a valid GLMConfig ({exc})") from exc


def load_checkpoint(
    directory: str | os.PathLike, *, map_location: str | torch.device = "cpu", **model_options: Any
) -> GLMModel:
    """The ``GLMModel`` saved by ``save_checkpoint`` (weights in their saved dtype, on
    ``map_location``); ``model_options`` (backends, checkpointing) go to ``GLMModel``.

    Raises :class:`~glm_ext.files.CorruptFileError` (a ValueError) naming the file when a file
    differs from its checksum or cannot be read, and ValueError when the weights do not fit the config.
    """
    directory = Path(directory)
    if not is_checkpoint(directory):
        raise FileNotFoundError(f"{directory} is not a glm_ext checkpoint (needs {WEIGHTS_FILE} and {CONFIG_FILE})")
    verify_manifest(directory, required=(WEIGHTS_FILE, CONFIG_FILE))
    config = _read_config(directory / CONFIG_FILE)
    try:
        state = load_file(directory / WEIGHTS_FILE, device=str(torch.device(map_location)))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CorruptFileError(f"{directory / WEIGHTS_FILE} is damaged or not a safetensors file ({exc})") from exc
    return _model_from_state(state, config, model_options)


def checkpoint_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """The metadata saved with a checkpoint (``save_checkpoint(metadata=...)``; empty for a
    checkpoint written before manifests existed)."""
    manifest = read_manifest(Path(directory))
    return manifest["metadata"] if manifest else {}


# --------------------------------------------------------------------------------------------
# The authors' layout


def _torch_load(path: Path, map_location: str | torch.device) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if _is_torch_file(path):
            raise ValueError(
                f"{path} holds objects other than tensors and cannot be read with torch.load(weights_only=True) "
                f"({str(exc).splitlines()[0]}). If you trust the file, load it yourself "
                "(torch.load(path, weights_only=False)) and pass its state dict instead."
            ) from exc
        raise CorruptFileError(f"{path} is not a PyTorch checkpoint (torch.save file)") from exc
    except Exception as exc:  # torch.load fails on foreign bytes in many ways (KeyError, EOFError, RuntimeError, ...)
        raise CorruptFileError(
            f"{path} is not a PyTorch checkpoint (torch.save file), or it is damaged ({type(exc).__name__})"
        ) from exc


def _is_torch_file(path: Path) -> bool:
    """Whether ``path`` starts as ``torch.save`` files do (a zip archive, or before PyTorch 1.6 a
    pickled magic number), so that an unpickling failure means foreign objects, not foreign bytes."""
    with open(path, "rb") as file:
        return file.read(4) in (b"PK\x03\x04", b"\x80\x02\x8a\n")


def _authors_files(directory: Path) -> list[Path]:
    """The weight file(s) of a checkpoint directory, in the places the authors and the port use."""
    tracker = directory / AUTHORS_TRACKER_FILE
    candidates = [directory / AUTHORS_WEIGHTS_FILE]
    if tracker.is_file():
        candidates.insert(0, directory / tracker.read_text(encoding="utf-8").strip() / AUTHORS_WEIGHTS_FILE)
    candidates.append(directory / HF_WEIGHTS_FILE)
    for candidate in candidates:
        if candidate.is_file():
            return [candidate]
    index = directory / HF_INDEX_FILE
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [directory / shard for shard in shards]
    raise FileNotFoundError(
        f"no checkpoint in {directory}: looked for {', '.join(str(c) for c in candidates)} and {index}"
    )


def load_authors_state_dict(
    path_or_state_dict: str | os.PathLike | Mapping[str, Any], *, map_location: str | torch.device = "cpu"
) -> StateDict:
    """The weights of an authors' or Hugging Face checkpoint, in our keys (not yet validated).

    Accepts a file, a checkpoint directory (see the module docstring) or an already loaded object;
    unwraps ``"module"``, strips the ``glm.`` prefix and drops a tied ``lm_head.weight`` copy.
    """
    if isinstance(path_or_state_dict, Mapping):
        loaded: Mapping[str, Any] = path_or_state_dict
    else:
        path = Path(path_or_state_dict)
        files = _authors_files(path) if path.is_dir() else [path]
        loaded = {}
        for file in files:
            content = _torch_load(file, map_location)
            if not isinstance(content, Mapping):
                raise ValueError(f"{file} holds a {type(content).__name__}, not a state dict")
            loaded.update(content)
    if isinstance(loaded.get("module"), Mapping):
        loaded = loaded["module"]
    state: StateDict = {}
    for key, value in loaded.items():
        name = key.removeprefix(HF_PREFIX)
        if name in state:
            raise ValueError(f"{name} appears both with and without the {HF_PREFIX!r} prefix")
        state[name] = value
    for key in TIED_OUTPUT_KEYS:
        if key in state:
            _drop_tied_copy(state, key)
    return state


def _drop_tied_copy(state: StateDict, key: str) -> None:
    tied = state.pop(key)
    word = state.get(WORD_EMBEDDINGS_KEY)
    if word is None or not isinstance(tied, torch.Tensor) or not isinstance(word, torch.Tensor):
        raise ValueError(f"{key} is present but {WORD_EMBEDDINGS_KEY} is not: the output projection must be tied")
    if tied.shape != word.shape or not torch.equal(tied, word.to(tied.device)):
        raise ValueError(
            f"{key} differs from {WORD_EMBEDDINGS_KEY}: GLM ties the output projection to the word "
            "embedding and untied weights cannot be imported"
        )


def import_authors_checkpoint(
    path_or_state_dict: str | os.PathLike | Mapping[str, Any],
    config: GLMConfig,
    *,
    map_location: str | torch.device = "cpu",
    **model_options: Any,
) -> GLMModel:
    """A ``GLMModel`` holding the weights of an authors' or Hugging Face checkpoint.

    ``config`` must describe the checkpoint (e.g. ``GLMConfig.preset("large")``); missing,
    unexpected or mis-shaped keys raise ValueError naming them. The model adopts the loaded
    tensors (no copy, dtype kept). ``model_options`` go to ``GLMModel``.
    """
    state = load_authors_state_dict(path_or_state_dict, map_location=map_location)
    return _model_from_state(state, config, model_options)


def export_authors_state_dict(model: GLMModel) -> StateDict:
    """The model's weights under the authors' keys (detached tensors sharing the model's memory)."""
    return {key: value.detach() for key, value in model.state_dict().items()}


def save_authors_checkpoint(model: GLMModel, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Writes ``{"module": export_authors_state_dict(model)}`` with ``torch.save``, atomically.

    ``path`` is the file to write, or an existing directory that receives
    ``mp_rank_00_model_states.pt``. An existing file is replaced only with ``overwrite=True``
    (FileExistsError otherwise). Returns the file written.
    """
    target = Path(path).absolute()
    if target.is_dir():
        target = target / AUTHORS_WEIGHTS_FILE
    if (target.exists() or target.is_symlink()) and not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True (--overwrite) to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    state = {"module": export_authors_state_dict(model)}
    write_file_atomically(target, lambda f: torch.save(state, f), mode="wb")
    return target
