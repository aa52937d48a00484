"""`vlmtune train` of a contrastive recipe with probes, for tests/test_contrastive_deepspeed.py.

    python tests/contrastive_ds_worker.py train recipe.yaml distributed.num_processes=2 ...

Outside a launcher it goes through `vlmtune train`'s own re-launch (torchrun re-runs this script in each process).
Under the launcher each process records in $VLMTUNE_PROBE_DIR/rank<N>.json: per training forward its loss (the
negatives gathered from every process) and the loss of its own rows alone (not gathered), the world size, whether
ZeRO-3 partitioned the weights, the DeepSpeed stage and the trainer's log history; rank 0 also saves embeds.pt, the
in-training model's embeddings of fixed images and texts, computed by every process together right before the
adapter is gathered and saved. VLMTUNE_PROBE_SEQUENTIAL=1 feeds the pairs in file order.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

TEXTS = ["a red circle", "a blue square", "the triangle is green"]


def probe_images() -> list:
    from PIL import Image

    return [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 0, 255), (0, 160, 0))]


def install_probes(probe_dir: Path) -> None:
    from transformers.integrations.deepspeed import deepspeed_config, is_deepspeed_zero3_enabled

    from vlmtune import distributed
    from vlmtune.contrastive import model as model_module
    from vlmtune.contrastive import train
    from vlmtune.contrastive.losses import contrastive_loss
    from vlmtune.embedding import embed_images, embed_texts

    rank = int(os.environ.get("RANK", "0"))
    record = {"losses": [], "own_rows_losses": []}
    hooks = {}
    forward = model_module.DualEncoderLoss.forward

    def probed(self, pixel_values, input_ids, attention_mask=None):
        out = forward(self, pixel_values, input_ids, attention_mask)
        if self.training:
            base = self.model.get_base_model()
            with torch.no_grad():
                alone = contrastive_loss(self.loss, out["image_embeds"], out["text_embeds"], base.logit_scale,
                                         getattr(base, "logit_bias", None), gather=False)
            record["losses"].append(float(out["loss"]))
            record["own_rows_losses"].append(float(alone))
        return out

    model_module.DualEncoderLoss.forward = probed

    if os.environ.get("VLMTUNE_PROBE_SEQUENTIAL") == "1":
        original_args = train._training_args

        def sequential(*args, **kwargs):
            made = original_args(*args, **kwargs)
            made.train_sampling_strategy = "sequential"
            return made

        train._training_args = sequential

    original_build, original_state = train.build_run, train.trained_state

    def build_run(*args, **kwargs):
        hooks["run"] = original_build(*args, **kwargs)
        return hooks["run"]

    def trained_state(peft_model):
        run = hooks["run"]
        peft_model.eval()
        with torch.no_grad():
            embeds = {"images": torch.as_tensor(embed_images(peft_model, run.processor, probe_images())),
                      "texts": torch.as_tensor(embed_texts(peft_model, run.processor, TEXTS))}
        if rank == 0:
            torch.save(embeds, probe_dir / "embeds.pt")
        record.update(world_size=distributed.world_size(), zero3=is_deepspeed_zero3_enabled(),
                      ds_config=deepspeed_config(), log_history=run.trainer.state.log_history)
        (probe_dir / f"rank{rank}.json").write_text(json.dumps(record))
        return original_state(peft_model)

    train.build_run, train.trained_state = build_run, trained_state


def main() -> int:
    from vlmtune import cli, distributed

    probe = os.environ.get("VLMTUNE_PROBE_DIR")
    if probe and distributed.under_launcher():
        Path(probe).mkdir(parents=True, exist_ok=True)
        install_probes(Path(probe))
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
