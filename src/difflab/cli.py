"""The `difflab` command: train | sample | eval | demo | schedules."""

from __future__ import annotations

import argparse
import sys

from difflab import __version__

NOT_YET = 2


def _not_yet(name: str) -> int:
    print(f"difflab {name}: not yet available in this version", file=sys.stderr)
    return NOT_YET


def cmd_schedules(args: argparse.Namespace) -> int:
    from difflab.schedules import SCHEDULE_NAMES, Schedule
    from difflab.viz import plot_schedules

    print(f"{'schedule':<22}{'alpha_bar[0]':>14}{'alpha_bar[T-1]':>16}{'logSNR[0]':>11}{'logSNR[T-1]':>13}")
    for name in SCHEDULE_NAMES:
        for ztsnr in (False, True):
            s = Schedule.make(name, T=args.T, zero_terminal_snr=ztsnr)
            print(
                f"{s.name:<22}{s.alpha_bar[0].item():>14.6f}{s.alpha_bar[-1].item():>16.3e}"
                f"{s.log_snr[0].item():>11.2f}{s.log_snr[-1].item():>13.2f}"
            )
    print(f"wrote {plot_schedules(args.out, T=args.T)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    args.T, args.out = 1000, str(Path(args.out) / "schedules.png")
    return cmd_schedules(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="difflab", description="Diffusion models: train, sample, evaluate.")
    p.add_argument("--version", action="version", version=f"difflab {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("schedules", help="print the noise schedules and plot alpha_bar and SNR (PNG)")
    s.add_argument("--T", type=int, default=1000)
    s.add_argument("--out", default="schedules.png")
    s.set_defaults(func=cmd_schedules)

    d = sub.add_parser("demo", help="the main job: sample from the shipped model and report its metrics")
    d.add_argument("--out", default="out/demo")
    d.set_defaults(func=cmd_demo)

    for name, text in [("train", "train a recipe"), ("sample", "sample from a model"), ("eval", "evaluate a model")]:
        c = sub.add_parser(name, help=f"{text} (not yet available)")
        c.add_argument("rest", nargs=argparse.REMAINDER)
        c.set_defaults(func=lambda a, n=name: _not_yet(n))
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except ValueError as e:  # bad input: a clear message, not a traceback
        print(f"difflab {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
