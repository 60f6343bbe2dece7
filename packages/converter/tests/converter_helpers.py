import json
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from torchspec.draft_models import AutoEagle3DraftModel, DeepseekEagle3Config, LlamaEagle3Config, default_aux_layer_ids

VOCAB = 120


def tiny_draft(kind: str, draft_vocab: int = VOCAB, seed: int = 0, **options):
    common = dict(
        hidden_size=32,
        vocab_size=VOCAB,
        draft_vocab_size=draft_vocab,
        num_attention_heads=4,
        intermediate_size=48,
        torch_dtype="float32",
        **options,
    )
    if kind == "llama":
        config = LlamaEagle3Config(num_key_value_heads=2, head_dim=12, **common)
    else:
        config = DeepseekEagle3Config(
            q_lora_rank=16, kv_lora_rank=448, qk_nope_head_dim=8, qk_rope_head_dim=64, v_head_dim=6, **common
        )
    torch.manual_seed(seed)
    draft = AutoEagle3DraftModel.from_config(config)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    if draft_vocab < VOCAB:
        kept = torch.randperm(VOCAB)[:draft_vocab].sort().values
        t2d = torch.zeros(VOCAB, dtype=torch.bool)
        t2d[kept] = True
        draft.set_vocab_mapping(kept - torch.arange(draft_vocab), t2d)
    return draft


def write_training_checkpoint(draft, output_dir: Path, step: int = 10, aux_layer_ids=None, num_target_layers=6) -> Path:
    """A checkpoint in the trainer's layout (see torchspec.draft_models.checkpoint_layout)."""
    path = Path(output_dir) / f"iter_{step:07d}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": draft.state_dict(), "step": step}, checkpoint_id=str(path))
    draft.config.save_pretrained(path)
    ids = aux_layer_ids or default_aux_layer_ids(num_target_layers)
    (path / "aux_layers.json").write_text(json.dumps({"aux_layer_ids": ids, "num_target_layers": num_target_layers}))
    (path / "COMPLETE").write_text(json.dumps({"step": step, "world_size": 1}))
    (Path(output_dir) / "latest").write_text(path.name)
    return path


def draft_logits(draft, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (1, 6), generator=gen)
    h3 = torch.randn(1, 6, 3 * 32, generator=gen)
    with torch.no_grad():
        hidden, _, _ = draft.backbone(
            draft.embed_input_ids(ids), draft.project_hidden_states(h3), None, torch.arange(6)[None]
        )
        return draft.compute_logits(hidden)
