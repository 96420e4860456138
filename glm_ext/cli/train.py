"""``glm-ext train``: pretrain (or resume) a GLM with blank infilling on a token file."""

from __future__ import annotations

import argparse
import os

from glm_ext.cli.common import error, reports_errors


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "train", help="pretrain a GLM with blank infilling on a token file",
        description="Trains (or resumes: the newest checkpoint in --output-dir) a GLM on a token file "
        "made by prepare-data. Writes OUTPUT_DIR/checkpoints/step-N, OUTPUT_DIR/latest and a copy of the "
        "tokenizer, so that `glm-ext generate OUTPUT_DIR ...` works.",
    )
    parser.add_argument("--data", required=True, metavar="PREFIX", help="training token file (prepare-data --output)")
    parser.add_argument("--tokenizer", help="tokenizer.json of the token file (default: PREFIX.tokenizer.json)")
    parser.add_argument("--eval-data", metavar="PREFIX", help="held-out token file for the held-out loss")
    parser.add_argument("--output-dir", required=True, help="run directory (checkpoints, resumed if present)")
    parser.add_argument("--preset", default="tiny", help="model size from glm_ext.model.PRESETS (default: tiny)")
    parser.add_argument("--position-encoding", choices=("learned_2d", "rotary_2d"), default="learned_2d",
                        help="learned 2D tables (the authors' GLM, default) or 2D rotary (ChatGLM)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128, help="tokens per blank-infilling row")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (linear warmup, cosine decay)")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--eval-every", type=int, default=0, help="steps between held-out evaluations (0: end only)")
    parser.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (0: end only)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float64"),
                        help="auto: bf16 autocast on CUDA, float32 on the CPU")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.set_defaults(run=run)


@reports_errors
def run(args: argparse.Namespace) -> int:
    from glm_ext.training import TrainConfig, Trainer

    tokenizer = args.tokenizer or f"{args.data}.tokenizer.json"
    if not os.path.isfile(tokenizer):
        return error(f"no tokenizer at {tokenizer}; pass --tokenizer (the one the token file was made with)", 2)
    config = TrainConfig(
        train_data=args.data, tokenizer=tokenizer, eval_data=args.eval_data, output_dir=args.output_dir,
        preset=args.preset, model_overrides={"position_encoding": args.position_encoding}, steps=args.steps,
        batch_size=args.batch_size, max_length=args.max_length,
        lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
        seed=args.seed, log_every=args.log_every, eval_every=args.eval_every, save_every=args.save_every,
        device=args.device, dtype=args.dtype, compile=args.compile,
    )
    trainer = Trainer(config)
    if trainer.resume():
        print(f"resumed {args.output_dir} at step {trainer.step}")
    parameters = sum(p.numel() for p in trainer.model.parameters())
    print(f"training {parameters:,} parameters ({trainer.model.config}) on {trainer.device} "
          f"for {config.steps} steps of {config.batch_size} x {config.max_length} tokens")
    summary = trainer.fit()
    print(f"done: step {summary['step']}, checkpoint {summary['checkpoint']}")
    return 0
