"""Export time and peak RSS for a Qwen3-8B-sized MLA draft (about 1.49 billion parameters).

    python packages/converter/benchmarks/bench_export.py [--dtype bfloat16] [--workdir /tmp/bench]

Step 1 (a subprocess) writes a DCP checkpoint with random weights in the trainer's layout;
step 2 (another subprocess, so its ru_maxrss is the export's alone) exports it. The checkpoint is
stored in bfloat16 by default (a GPU run's dtype); the figures compare the export's peak RSS with
the size of the exported model.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

CONFIG = Path(__file__).resolve().parents[3] / "configs" / "draft_models" / "qwen3-8b-eagle3-mla.json"


def _write_checkpoint(workdir: Path, dtype: str) -> None:
    import torch
    import torch.distributed.checkpoint as dcp

    from torchspec.draft_models import AutoDraftModelConfig, AutoEagle3DraftModel

    config = AutoDraftModelConfig.from_dict({**json.loads(CONFIG.read_text()), "draft_vocab_size": 151936})
    with torch.device("meta"):
        draft = AutoEagle3DraftModel.from_config(config)
    draft.to_empty(device="cpu")
    draft = draft.to(getattr(torch, dtype))
    with torch.no_grad():
        for p in draft.parameters():
            p.normal_(0, 0.02)
    path = workdir / "run" / "iter_0000001"
    dcp.save({"model": draft.state_dict()}, checkpoint_id=str(path))
    config.save_pretrained(path)
    (path / "COMPLETE").write_text("{}")
    (path / "aux_layers.json").write_text(json.dumps({"aux_layer_ids": [2, 18, 33], "num_target_layers": 36}))


def _export(workdir: Path) -> None:
    from torchspec.converter import export_checkpoint

    start = time.perf_counter()
    result = export_checkpoint(workdir / "run", workdir / "export", include_embeddings=True, force=True)
    seconds = time.perf_counter() - start
    size = (result.output / "model.safetensors").stat().st_size
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        json.dumps(
            dict(
                parameters=result.num_parameters,
                export_seconds=round(seconds, 1),
                exported_gb=round(size / 1e9, 2),
                peak_rss_gb=round(peak / 1e9, 2),
                peak_rss_over_model_size=round(peak / size, 2),
            )
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--workdir", default="/tmp/torchspec-bench-export")
    parser.add_argument("--step", choices=["write", "export"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    workdir = Path(args.workdir)
    if args.step == "write":
        return _write_checkpoint(workdir, args.dtype)
    if args.step == "export":
        return _export(workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    try:
        for step in ("write", "export"):
            out = subprocess.run(
                [sys.executable, __file__, "--step", step, "--dtype", args.dtype, "--workdir", str(workdir)],
                check=True,
                capture_output=True,
                text=True,
            )
        print(out.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
