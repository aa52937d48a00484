"""Contrastive LoRA throughput: a hand-written PyTorch loop over transformers' CLIPModel / SiglipModel with PEFT
LoRA (what users write today; TRL has no contrastive trainer) beside vlmtune's `method: contrastive`, on the same
synthetic caption data, the same LoRA, learning rate, batch size and steps, each arm in its own process:

    python bench/contrastive_throughput.py --arch clip-vit-base-patch32 --batch-size 16 --steps 8 --torch-threads 1 \
        --out bench/results/contrastive-cpu-clip-vit-base-patch32.json
    python bench/contrastive_throughput.py --arch tiny --family siglip --steps 2 --batch-size 4   # smoke

Arms:
- `plain`: `<Family>Model.from_pretrained` (fp32 weights; bf16 autocast on a GPU), `get_peft_model` with a
  LoraConfig written out (r 16, alpha 32, dropout 0.05 on both towers' encoder attention and MLP linears, the
  projections as modules_to_save, the temperature trainable), the processor called on each batch (padding as the
  model card shows: True for CLIP, "max_length" for SigLIP), `model(**batch, return_loss=True).loss` (the model's
  own loss), torch.optim.AdamW at the learning rate, a shuffled DataLoader without workers.
- `vlmtune`: `vlmtune.train(vlmtune.load_recipe(recipe.yaml))` on a recipe with method contrastive and its
  defaults; set to match: batch size, max_steps, `gradient_accumulation_steps: 1` (the schema's default is 8),
  learning rate, seed, logging every step (the plain loop reads every step's loss too).

Models (`--arch`): `tiny` (vlmtune's tiny random CLIP or SigLIP, `--family`), `clip-vit-base-patch32` and
`siglip-base-patch16-224` (the published architectures, random fp32 weights, the published image processors'
settings; the tokenizer is vlmtune's tiny BPE one over an embedding table of the real vocabulary size).
Internal entry point (the parent runs it once per arm): `_arm SPEC.json`.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput.cli import run_child  # noqa: E402
from throughput.common import (  # noqa: E402
    GIB,
    HERE,
    cpu_name,
    device_name,
    load_average,
    now,
    peak_rss,
    read_json,
    versions,
    write_json,
)

ARMS = ("plain", "vlmtune")
ARCHS = ("tiny", "clip-vit-base-patch32", "siglip-base-patch16-224")
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}  # vlmtune's LoraConfig defaults (config/schema.py)
# The plain arm's LoRA, written out as a user would: the towers' encoder attention and MLP linears (what vlmtune's
# dual-encoder families target), the projections trained whole, the temperature trainable.
TARGETS = r"^(vision_model|text_model)\.encoder\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.fc1|mlp\.fc2)$"
FAMILY = {  # model_type -> what the plain arm needs
    "clip": {"model": "CLIPModel", "projections": ["visual_projection", "text_projection"],
             "temperature": ["logit_scale"], "padding": True},
    "siglip": {"model": "SiglipModel", "projections": ["vision_model.head", "text_model.head"],
               "temperature": ["logit_scale", "logit_bias"], "padding": "max_length"},
}
# The published configs' shapes (openai/clip-vit-base-patch32, google/siglip-base-patch16-224), checked against
# the configs built here from transformers' defaults.
PUBLISHED = {
    "clip-vit-base-patch32": {
        "family": "clip", "projection_dim": 512,
        "text": {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                 "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu"},
        "vision": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                   "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu"}},
    "siglip-base-patch16-224": {
        "family": "siglip",
        "text": {"vocab_size": 32000, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                 "num_attention_heads": 12, "max_position_embeddings": 64, "hidden_act": "gelu_pytorch_tanh"},
        "vision": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                   "image_size": 224, "patch_size": 16, "hidden_act": "gelu_pytorch_tanh"}},
}


# ---------------------------------------------------------------- model and data (parent process)

def _check_published(arch: str, config) -> None:
    want = PUBLISHED[arch]
    got = {"text": config.text_config, "vision": config.vision_config}
    wrong = [f"{tower}.{k}: {getattr(got[tower], k)} (published {v})" for tower in ("text", "vision")
             for k, v in want[tower].items() if getattr(got[tower], k) != v]
    if "projection_dim" in want and config.projection_dim != want["projection_dim"]:
        wrong.append(f"projection_dim: {config.projection_dim} (published {want['projection_dim']})")
    if wrong:
        raise SystemExit(f"error: the {arch} config built from this transformers' defaults differs from the "
                         f"published one: {'; '.join(wrong)}; set those fields in bench/contrastive_throughput.py")


def _build_real(arch: str):
    import transformers

    from vlmtune.embedding.tiny_tokenizer import build_tiny_clip_tokenizer

    family = PUBLISHED[arch]["family"]
    tok = build_tiny_clip_tokenizer(model_max_length=PUBLISHED[arch]["text"]["max_position_embeddings"])
    special = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if family == "clip":
        config = transformers.CLIPConfig(text_config=special)  # the defaults are ViT-B/32's shapes
        images = transformers.CLIPImageProcessor()  # 224 shortest edge, 224 centre crop, OpenAI's mean/std
        processor = transformers.CLIPProcessor(image_processor=images, tokenizer=tok)
    else:
        config = transformers.SiglipConfig(text_config=special)  # the defaults are base-patch16-224's shapes
        processor = transformers.SiglipProcessor(image_processor=transformers.SiglipImageProcessor(), tokenizer=tok)
    _check_published(arch, config)
    return family, config, getattr(transformers, FAMILY[family]["model"]), processor, len(tok)


def _parameter_counts(model, family: str) -> dict:
    groups = {"vision_tower": "vision_model.", "text_tower": "text_model."}
    counts = {"total": sum(p.numel() for p in model.parameters())}
    for key, prefix in groups.items():
        counts[key] = sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))
    counts["projections"] = sum(p.numel() for m in FAMILY[family]["projections"]
                                for p in model.get_submodule(m).parameters())  # SigLIP's heads: inside the towers
    return counts


def build_model(arch: str, family: str, out: Path, seed: int) -> dict:
    """The model folder (reused when its bench-model.json matches) and its info."""
    import torch
    import transformers

    key = {"arch": arch, "family": family, "seed": seed, "transformers": transformers.__version__}
    marker = out / "bench-model.json"
    if marker.is_file() and read_json(marker)["key"] == key:
        return read_json(marker)["info"]
    shutil.rmtree(out, ignore_errors=True)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if arch == "tiny":
        from vlmtune.embedding.tiny import build_tiny_dir

        build_tiny_dir(tmp, family, seed)
        config = transformers.AutoConfig.from_pretrained(tmp)
        model = getattr(transformers, FAMILY[family]["model"])(config)
        tokenizer = "vlmtune's tiny BPE tokenizer (vlmtune/embedding/tiny_tokenizer.py), its own vocabulary size"
    else:
        family, config, cls, processor, tok_size = _build_real(arch)
        torch.manual_seed(seed)
        model = cls(config)
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        tokenizer = (f"vlmtune's tiny BPE tokenizer ({tok_size} tokens, built offline) over the real-size embedding "
                     f"table ({config.text_config.vocab_size} rows): a real tokenizer is not needed for throughput "
                     "(captions here are a few tokens either way)")
    info = {"arch": arch, "family": family, "parameters": _parameter_counts(model, family), "tokenizer": tokenizer,
            "text_config": {k: getattr(config.text_config, k) for k in PUBLISHED["siglip-base-patch16-224"]["text"]},
            "vision_config": {k: getattr(config.vision_config, k) for k in PUBLISHED["siglip-base-patch16-224"]["vision"]},
            "published_shapes_checked": arch != "tiny"}
    write_json(tmp / "bench-model.json", {"key": key, "info": info})
    tmp.replace(out)
    return info


def build_data(out: Path, n: int, image_size: int, seed: int) -> Path:
    """`n` shape images of image_size px and train.jsonl with one caption each (drawn from --seed), reused when
    present: the same rows for both arms."""
    from vlmtune.contrastive.pairs import make_shape_captions

    if (out / "train.jsonl").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    make_shape_captions(tmp, n_train=n, n_eval=0, seed=seed, size=image_size)
    rng = random.Random(seed)
    rows = [json.loads(line) for line in (tmp / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    text = "".join(json.dumps({"image": r["image"], "caption": rng.choice(r["caption"])}) + "\n" for r in rows)
    (tmp / "train.jsonl").write_text(text, encoding="utf-8")  # inside the temp folder, renamed whole below
    (tmp / "eval.jsonl").unlink()
    tmp.replace(out)
    return out


# ---------------------------------------------------------------- arms (one process each)

class StepClock:
    """Wall-clock ends of each step (GPU synchronised) and the samples seen."""

    def __init__(self, cuda: bool):
        self.cuda, self.ends, self.samples, self.losses, self.start = cuda, [], 0, [], None

    def _now(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def begin(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        self.start = self._now()

    def step_end(self) -> None:
        self.ends.append(self._now())

    def summary(self) -> dict:
        import torch

        steps = [b - a for a, b in zip([self.start, *self.ends], self.ends, strict=False)]
        return {"steps": len(steps), "samples": self.samples, "train_seconds": self.ends[-1] - self.start,
                "step_seconds": steps, "final_loss": self.losses[-1] if self.losses else None,
                "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated() if self.cuda else None}


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def run_plain(spec: dict) -> dict:
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    from PIL import Image

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    fam = FAMILY[spec["family"]]
    model = getattr(transformers, fam["model"]).from_pretrained(spec["model_dir"], dtype=torch.float32).to(device)
    processor = transformers.AutoProcessor.from_pretrained(spec["model_dir"])
    torch.manual_seed(spec["seed"])
    config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], target_modules=TARGETS,
                        modules_to_save=fam["projections"])
    model = get_peft_model(model, config)
    for name in fam["temperature"]:
        getattr(model.get_base_model(), name).requires_grad_(True)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec["learning_rate"])
    data = Path(spec["data_dir"])
    rows = [json.loads(line) for line in (data / "train.jsonl").read_text(encoding="utf-8").splitlines()]

    def collate(batch):
        images = [Image.open(data / r["image"]).convert("RGB") for r in batch]
        return processor(text=[r["caption"] for r in batch], images=images, return_tensors="pt",
                         padding=fam["padding"], truncation=True)

    loader = torch.utils.data.DataLoader(rows, batch_size=spec["batch_size"], shuffle=True, collate_fn=collate,
                                         generator=torch.Generator().manual_seed(spec["seed"]))
    clock = StepClock(cuda)
    clock.begin()
    while len(clock.ends) < spec["steps"]:
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
                loss = model(**batch, return_loss=True).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            clock.samples += batch["pixel_values"].shape[0]
            clock.losses.append(loss.item())
            clock.step_end()
            if len(clock.ends) == spec["steps"]:
                break
    return {**clock.summary(), "trainable_parameters": _trainable(model)}


def write_recipe(spec: dict, path: Path) -> Path:
    import yaml

    recipe = {
        "method": "contrastive",
        "model": {"name_or_path": spec["model_dir"], "family": spec["family"]},
        "lora": dict(LORA),
        "data": {"train": str(Path(spec["data_dir"]) / "train.jsonl"), "format": "caption"},
        "train": {"max_steps": spec["steps"], "per_device_train_batch_size": spec["batch_size"],
                  "gradient_accumulation_steps": 1,  # the schema's default is 8: 8 batches a step
                  "learning_rate": spec["learning_rate"], "seed": spec["seed"], "logging_steps": 1,
                  "save_steps": 100000, "report_to": ["none"]},
        "output_dir": spec["run_dir"],
    }
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    tmp.replace(path)
    return path


def run_vlmtune(spec: dict) -> dict:
    import torch
    import transformers

    import vlmtune
    import vlmtune.contrastive.train as ct

    clock = StepClock(torch.cuda.is_available())
    seen = {}

    class Clock(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock.begin()

        def on_step_end(self, args, state, control, **kwargs):
            clock.step_end()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                clock.losses.append(logs["loss"])

    original = ct.build_run

    def build_run_with_clock(*args, **kwargs):  # vlmtune.train takes no callbacks: add ours to its trainer
        run = original(*args, **kwargs)
        trainer = run.trainer
        trainer.add_callback(Clock())
        compute_loss = trainer.compute_loss

        def counted(model, inputs, *a, **k):
            clock.samples += inputs["pixel_values"].shape[0]
            return compute_loss(model, inputs, *a, **k)

        trainer.compute_loss = counted
        seen["trainable"] = _trainable(run.peft_model)
        return run

    ct.build_run = build_run_with_clock
    shutil.rmtree(spec["run_dir"], ignore_errors=True)
    recipe = vlmtune.load_recipe(write_recipe(spec, Path(spec["run_dir"]).with_suffix(".yaml")))
    result = vlmtune.train(recipe, overwrite=True)
    return {**clock.summary(), "trainable_parameters": seen["trainable"], "global_step": result.metrics.get("global_step")}


def cmd_arm(spec: dict) -> int:
    start = time.perf_counter()
    if spec.get("torch_threads"):
        import torch

        torch.set_num_threads(spec["torch_threads"])
    result = (run_plain if spec["arm"] == "plain" else run_vlmtune)(spec)
    result["peak_rss_bytes"] = peak_rss()["self"]
    result["process_seconds_in_arm"] = time.perf_counter() - start
    write_json(Path(spec["result"]), result)
    return 0


# ---------------------------------------------------------------- parent: options, arms, report

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", choices=ARCHS, default="tiny")
    p.add_argument("--family", choices=tuple(FAMILY), default="clip", help="with --arch tiny: which tiny model")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)}")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=8, help="training steps; the data holds batch-size x steps pairs")
    p.add_argument("--image-size", type=int, default=224, help="side of the PNG images (the processor resizes)")
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch.set_num_threads and OMP_NUM_THREADS in the arm processes (1 is steadier on a busy CPU)")
    p.add_argument("--work-dir", type=Path, default=HERE / ".work", help="model, data and run folders (reused)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default bench/results/contrastive-<cpu|gpu>-<arch>.json)")
    p.add_argument("--arm-timeout", type=float, default=None, help="seconds per arm process")
    args = p.parse_args(argv)
    args.arm_list = [a.strip() for a in args.arms.split(",") if a.strip()]
    if not args.arm_list or any(a not in ARMS for a in args.arm_list):
        p.error(f"--arms must name some of {', '.join(ARMS)}; got {args.arms!r}")
    for name in ("batch_size", "steps", "image_size"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.arch != "tiny":
        args.family = PUBLISHED[args.arch]["family"]
    return args


def step_figures(step_seconds: list[float], samples: int) -> dict:
    """Per-step figures that a busy CPU disturbs less than the total: steady (without step 1), median and fastest
    step, as samples per second."""
    import statistics

    per_step = samples / len(step_seconds)
    steady = step_seconds[1:]
    return {"steady_samples_per_second": per_step * len(steady) / sum(steady) if steady else None,
            "median_step_samples_per_second": per_step / statistics.median(step_seconds),
            "fastest_step_samples_per_second": per_step / min(step_seconds)}


def _arm_figures(raw: dict, wall: float, load_before) -> dict:
    return {
        "steps": raw["steps"], "samples": raw["samples"], "samples_per_second": raw["samples"] / raw["train_seconds"],
        **step_figures(raw["step_seconds"], raw["samples"]),
        "train_seconds": raw["train_seconds"], "wall_seconds": wall, "step_seconds": raw["step_seconds"],
        "peak_rss_bytes": raw["peak_rss_bytes"], "peak_rss_gib": raw["peak_rss_bytes"] / GIB,
        "peak_gpu_memory_bytes": raw["peak_gpu_memory_bytes"],
        "peak_gpu_memory_gib": raw["peak_gpu_memory_bytes"] / GIB if raw["peak_gpu_memory_bytes"] else None,
        "final_loss": raw["final_loss"], "trainable_parameters": raw["trainable_parameters"],
        "load_average_before": load_before, "load_average_after": load_average(),
    }


RATIO_KEYS = ("samples_per_second", "steady_samples_per_second", "median_step_samples_per_second",
              "fastest_step_samples_per_second", "train_seconds", "wall_seconds", "peak_rss_bytes", "peak_gpu_memory_bytes")


def ratios(arms: dict) -> dict:
    a, b = arms.get("vlmtune", {}), arms.get("plain", {})
    return {k: a[k] / b[k] for k in RATIO_KEYS if a.get(k) and b.get(k)}


def same_work(arms: dict) -> dict:
    """Whether the arms trained the same steps, samples and trainable parameters (None with an arm missing)."""
    a, b = arms.get("vlmtune", {}), arms.get("plain", {})
    return {k: (a[k] == b[k] if k in a and k in b else None) for k in ("steps", "samples", "trainable_parameters")}


def table(report: dict) -> str:
    lines = ["| arm | steps | samples/s | steady samples/s | median step samples/s | train s | wall s | peak RSS GiB "
             "| peak GPU GiB | final loss |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, a in report["arms"].items():
        if "error" in a:
            lines.append(f"| {name} | error: {a['error']} |")
            continue
        gpu = f"{a['peak_gpu_memory_gib']:.2f}" if a["peak_gpu_memory_gib"] else "-"
        steady = f"{a['steady_samples_per_second']:.2f}" if a["steady_samples_per_second"] else "-"
        lines.append(f"| {name} | {a['steps']} | {a['samples_per_second']:.2f} | {steady} | {a['median_step_samples_per_second']:.2f} | {a['train_seconds']:.1f} "
                     f"| {a['wall_seconds']:.1f} | {a['peak_rss_gib']:.2f} | {gpu} | {a['final_loss']:.4f} |")
    if report["ratios"]:
        lines.append("vlmtune/plain: " + ", ".join(f"{k} {v:.2f}" for k, v in report["ratios"].items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    work = args.work_dir.resolve()
    label = args.arch if args.arch != "tiny" else f"tiny-{args.family}"
    n = args.batch_size * args.steps
    print(f"preparing {label} and {n} pairs in {work} ...", flush=True)
    model_dir = work / f"contrastive-model-{label}"
    model_info = build_model(args.arch, args.family, model_dir, args.seed)
    data_dir = build_data(work / f"contrastive-data-n{n}-px{args.image_size}-seed{args.seed}", n, args.image_size,
                          args.seed)
    cuda = torch.cuda.is_available()
    out = args.out or HERE / "results" / f"contrastive-{'gpu' if cuda else 'cpu'}-{label}.json"
    settings = {"arch": args.arch, "family": args.family, "batch_size": args.batch_size, "steps": args.steps,
                "num_pairs": n, "image_size": args.image_size, "learning_rate": args.learning_rate, "seed": args.seed,
                "torch_threads": args.torch_threads, "precision": "bf16 autocast, fp32 weights" if cuda else "fp32",
                "lora": {**LORA, "plain_target_modules": TARGETS, "plain_modules_to_save": FAMILY[args.family]["projections"],
                         "trainable_temperature": FAMILY[args.family]["temperature"]},
                "plain": {"optimizer": "torch.optim.AdamW(lr), no schedule, no clipping", "loss": "model(..., return_loss=True)",
                          "padding": FAMILY[args.family]["padding"], "dataloader_workers": 0},
                "vlmtune": {"recipe_fields": "method contrastive; model, data, lora r/alpha/dropout, max_steps, batch size, "
                            "gradient_accumulation_steps 1 (the schema's default 8 would train 8 batches a step), "
                            "learning_rate, seed, logging_steps 1, save_steps, report_to none; the rest vlmtune's defaults "
                            "(lr_scheduler cosine, warmup_ratio 0.03, max_grad_norm 1.0, weight_decay 0, adamw_torch)"},
                "timing": "train_seconds: the start of training (plain: before the first batch is loaded; vlmtune: "
                          "on_train_begin) to the end of the last step, batch loading included; steady: without step 1; "
                          "median / fastest step: per-step samples/s, less disturbed by other work on a shared CPU"}
    report = {"created": now(), "device": device_name(), "cpu": cpu_name(), "versions": versions(), "settings": settings,
              "model": model_info, "arms": {}, "ratios": {}}
    env = {"OMP_NUM_THREADS": str(args.torch_threads)} if args.torch_threads else {}
    for arm in args.arm_list:
        folder = work / f"contrastive-{label}-{arm}"
        folder.mkdir(parents=True, exist_ok=True)
        spec = {"arm": arm, "family": args.family, "model_dir": str(model_dir), "data_dir": str(data_dir),
                "batch_size": args.batch_size, "steps": args.steps, "learning_rate": args.learning_rate,
                "seed": args.seed, "torch_threads": args.torch_threads, "run_dir": str(folder / "run"),
                "result": str(folder / "result.json")}
        write_json(folder / "spec.json", spec)
        (folder / "result.json").unlink(missing_ok=True)
        load_before = load_average()
        print(f"arm {arm} ...", flush=True)
        rc, wall, tail = run_child([sys.executable, str(Path(__file__).resolve()), "_arm", str(folder / "spec.json")],
                                   folder / "arm.log", args.arm_timeout, env)
        if rc != 0:
            print(tail, file=sys.stderr)
            report["arms"][arm] = {"error": f"rc {rc}", "log": str(folder / "arm.log")}
            continue
        report["arms"][arm] = _arm_figures(read_json(folder / "result.json"), wall, load_before)
    report["ratios"], report["same_work"] = ratios(report["arms"]), same_work(report["arms"])
    write_json(out, report)
    print(table(report))
    if False in report["same_work"].values():
        print(f"warning: the arms did not train the same work: {report['same_work']}", file=sys.stderr)
    print(f"wrote {out}")
    return 0 if all("error" not in a for a in report["arms"].values()) else 1


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "_arm":
        sys.exit(cmd_arm(read_json(Path(sys.argv[2]))))
    sys.exit(main())
