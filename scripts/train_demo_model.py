"""Train the demo model, its concept LoRAs and the detector into iteris_demo/assets/shapes32.

    .venv/bin/python scripts/train_demo_model.py            # ~2 hours on 2 CPU cores
    .venv/bin/python scripts/train_demo_model.py --out DIR --base-steps 20 --lora-steps 5
    .venv/bin/python scripts/train_demo_model.py --check    # what the shipped model and LoRAs draw

Deterministic from the seed on one machine and torch version (train_log.json records both,
with each part's training time).
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from iteris_demo.check import check_assets  # noqa: E402
from iteris_demo.model import (  # noqa: E402
    ASSETS,
    BASE_STEPS,
    FINETUNE_STEPS,
    LORA_STEPS,
    build_demo_assets,
    demo_assets,
)
from iteris_sd.app.cli import TqdmProgress  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ASSETS)
    parser.add_argument("--base-steps", type=int, default=BASE_STEPS)
    parser.add_argument("--lora-steps", type=int, default=LORA_STEPS)
    parser.add_argument("--detector-steps", type=int, default=None)
    parser.add_argument("--finetune-steps", type=int, default=FINETUNE_STEPS)
    parser.add_argument("--pretrained", type=Path, default=None,
                        help="a base folder after the first phase (e.g. shapes32-v1's base): fine-tune from it")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", action="store_true", help="only measure the shipped assets (see check_assets)")
    parser.add_argument("--cfg", type=float, default=None, help="with --check: the CFG scale (default: the benchmark's)")
    args = parser.parse_args()
    if args.check:
        print(json.dumps(check_assets(demo_assets(), cfg=args.cfg), indent=2))
        return
    progress = TqdmProgress()
    folder = build_demo_assets(args.out, args.base_steps, args.lora_steps, args.detector_steps, args.seed, progress,
                               args.finetune_steps, args.pretrained)
    progress.close()
    print((folder / "train_log.json").read_text())
    print(f"wrote {folder}")


if __name__ == "__main__":
    main()
