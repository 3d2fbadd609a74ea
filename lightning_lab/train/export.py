"""Getting a trained policy out of lightning-lab: PEFT adapter folders and merged HF models.

Why PEFT's own format: it is what every other engine reads. ``peft.PeftModel.from_pretrained``,
vLLM's ``--lora-modules`` / ``/v1/load_lora_adapter``, TGI and TRL all take a folder with
``adapter_config.json`` + ``adapter_model.safetensors``; safetensors also means loading an adapter
never unpickles anything. Beside those two files we write ``lightning_lab.json``: the base model's
name and a *fingerprint* of its weights. A LoRA delta trained on one base applied to another base of
the same shapes loads without complaint everywhere and silently produces garbage, so our loaders
compare fingerprints and refuse with a clear message.

Writes are atomic (a temporary sibling renamed into place): an inference server polling or loading
the folder never sees half of an adapter.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..inference.adapters import base_model as _unwrapped
from ..inference.adapters import has_adapter as _has_adapter

__all__ = ["ExportError", "ADAPTER_META", "base_fingerprint", "save_adapter", "load_adapter",
           "save_merged", "read_adapter_meta", "export_checkpoint", "save_adapters",
           "export_adapters", "saved_adapter_dirs"]

ADAPTER_META = "lightning_lab.json"
_SAMPLE = 256
"""Values per tensor that enter the fingerprint: enough to tell two bases apart, cheap for 1.5B."""


class ExportError(ValueError):
    """An adapter or checkpoint cannot be exported or loaded as asked (wrong base, bad folder)."""


def base_fingerprint(model: Any) -> str:
    """A short hash of the base (non-LoRA) weights: names, shapes and a sample of values.

    Values are rounded to bfloat16 first, so the same base loaded in fp32 on a CPU and in bf16 on a
    GPU has the same fingerprint; a differently trained or initialised base does not.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(_unwrapped(model).state_dict().items()):
        if "lora_" in name:
            continue
        name = name.replace(".base_layer", "")
        sample = tensor.detach().flatten()[:_SAMPLE].to("cpu", torch.bfloat16).view(torch.int16)
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def _atomic_dir(out: Path, write: Any) -> Path:
    """``write(tmp)`` into a sibling temp dir, then swap it in for ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        tmp.chmod(0o755)  # mkdtemp is private; an inference server may run as another user
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def save_adapter(policy: Any, out: str | Path, *, step: int | None = None,
                 adapter: str | None = None) -> Path:
    """Write the policy's LoRA adapter as a standard PEFT folder (atomically); returns ``out``.

    ``policy`` is a ``Policy`` or a peft model. The ``default`` adapter is written, as
    ``adapter_config.json`` + ``adapter_model.safetensors`` + our ``lightning_lab.json`` (other
    adapters, if any, in peft's ``out/<name>/`` subfolders); ``adapter`` names one adapter to
    write alone at ``out`` (``export_adapters.save_adapters``).
    """
    model = getattr(policy, "model", policy)
    if not _has_adapter(model):
        raise ExportError("the policy has no LoRA adapter to export (loaded with lora=False?); "
                          "use save_merged for a fully trained model")
    base_name = getattr(policy, "name", "") or getattr(_unwrapped(model).config, "_name_or_path", "")
    meta = {"format_version": 1, "base_model": base_name, "base_fingerprint": base_fingerprint(model),
            "step": step}

    def write(tmp: Path) -> None:
        if adapter is None:
            model.save_pretrained(tmp, safe_serialization=True)
        else:  # peft writes a non-default adapter into a subfolder named after it: lift it up
            model.save_pretrained(tmp, safe_serialization=True, selected_adapters=[adapter])
            if adapter != "default":
                for item in (tmp / adapter).iterdir():
                    item.rename(tmp / item.name)
                (tmp / adapter).rmdir()
        config_path = tmp / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = base_name or None
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
        (tmp / ADAPTER_META).write_text(json.dumps(meta, indent=1))

    return _atomic_dir(Path(out), write)


def read_adapter_meta(directory: str | Path) -> dict[str, Any]:
    """``lightning_lab.json`` of an adapter folder; ExportError if it is not a PEFT adapter folder."""
    directory = Path(directory)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (directory / name).is_file():
            raise ExportError(f"{directory} is not a PEFT adapter folder: {name} is missing")
    meta_path = directory / ADAPTER_META
    if not meta_path.is_file():
        return {}
    try:
        return json.loads(meta_path.read_text())
    except ValueError as exc:
        raise ExportError(f"{meta_path} is not valid JSON: {exc}") from exc


def check_base(model: Any, directory: str | Path, meta: dict[str, Any] | None = None) -> None:
    """Refuse an adapter whose recorded base fingerprint differs from ``model``'s base weights."""
    meta = read_adapter_meta(directory) if meta is None else meta
    expected = meta.get("base_fingerprint")
    if expected is None:
        return  # a foreign PEFT adapter: peft's own shape checks are all we have
    actual = base_fingerprint(model)
    if actual != expected:
        raise ExportError(
            f"adapter {directory} was trained on base model {meta.get('base_model')!r} (fingerprint "
            f"{expected}), but this base model's weights differ (fingerprint {actual}); load it on "
            "the base it was trained on")


def load_adapter(policy: Any, directory: str | Path, adapter: str = "default") -> None:
    """Load a PEFT adapter folder's weights into the policy's ``adapter`` (in place).

    The policy must already carry a LoRA adapter of the same configuration; reads safetensors only.
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    model = getattr(policy, "model", policy)
    if not _has_adapter(model):
        raise ExportError("the policy has no LoRA adapter to load weights into (lora=False?)")
    directory = Path(directory)
    meta = read_adapter_meta(directory)
    check_base(model, directory, meta)
    state = load_file(directory / "adapter_model.safetensors")
    expected = {n for n, p in model.named_parameters() if f".{adapter}." in n}
    result = set_peft_model_state_dict(model, state, adapter_name=adapter)
    missing = sorted(n for n in result.missing_keys if "lora_" in n and n in expected)
    if result.unexpected_keys or missing:
        raise ExportError(f"adapter {directory} does not fit this policy's LoRA configuration: "
                          f"unexpected {sorted(result.unexpected_keys)[:3]}, missing {missing[:3]}")


def save_merged(policy: Any, out: str | Path, *, in_place: bool = False) -> Path:
    """Fold the adapter into the base weights and ``save_pretrained`` model + tokenizer to ``out``.

    ``in_place=False`` merges a copy (the policy keeps training); the CLI merges in place to
    avoid holding two copies of a large model.
    """
    model = policy.model
    if _has_adapter(model):
        model = (model if in_place else copy.deepcopy(model)).merge_and_unload()

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        policy.tokenizer.save_pretrained(tmp)

    return _atomic_dir(Path(out), write)


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, merge: bool = False,
                      model: str | None = None, device: str = "cpu") -> Path:
    """A trainer checkpoint (``step-N/`` or its parent with ``LATEST``) -> PEFT folder or merged model.

    The checkpoint's ``adapter/`` folder is the source (safetensors; nothing is unpickled). The base
    model is the one recorded in it unless ``model`` names another (which must have the same weights).
    """
    from ..inference import models
    from .checkpoint import resolve

    path = resolve(Path(checkpoint))
    adapter = path / "adapter"
    if adapter.is_dir() and len(saved_adapter_dirs(adapter)) > 1:  # one adapter per role
        return export_adapters(adapter, out, merge=merge, model=model, device=device)
    if not adapter.is_dir():
        raise ExportError(f"checkpoint {path} holds no adapter/ folder (written by lightning-lab "
                          "before adapter export existed, or trained without LoRA); re-save it "
                          "with trainer.save_adapter(dir) from a loaded trainer")
    meta = read_adapter_meta(adapter)
    base = model or meta.get("base_model")
    if not base:
        raise ExportError(f"{adapter} does not name its base model; pass --model")
    policy = models.load(base, lora=lora_kwargs(adapter), device=device)
    load_adapter(policy, adapter)
    if merge:
        return save_merged(policy, out, in_place=True)
    return save_adapter(policy, out, step=meta.get("step"))


def lora_kwargs(directory: Path) -> dict[str, Any]:
    """The ``LoraConfig`` fields that shape an adapter, from its ``adapter_config.json``."""
    config = json.loads((directory / "adapter_config.json").read_text())
    lora = {k: config[k] for k in ("r", "lora_alpha", "lora_dropout", "target_modules")}
    lora["target_modules"] = sorted(lora["target_modules"])
    return lora


# ---- one LoRA adapter per role (``inference/multi_lora``): one PEFT folder per adapter, as
# every consumer (``PeftModel.from_pretrained``, vLLM's ``--lora-modules writer=OUT/writer``)
# loads adapters one folder at a time. A checkpoint's ``adapter/`` keeps peft's own layout
# (``default`` at its root, the others in ``adapter/<name>/``).

def saved_adapter_dirs(directory: str | Path) -> dict[str, Path]:
    """Adapter name -> PEFT folder in a folder peft's ``save_pretrained`` wrote (``default`` at
    the root, every other adapter in a subfolder of its name)."""
    directory = Path(directory)
    subfolders = sorted(d for d in directory.iterdir()
                        if d.is_dir() and (d / "adapter_config.json").is_file())
    return {"default": directory, **{d.name: d for d in subfolders}}


def save_adapters(policy: Any, out: str | Path, *, step: int | None = None) -> Path:
    """Write each of the policy's adapters as its own PEFT folder ``out/<name>`` (each atomic)."""
    out = Path(out)
    for name in policy.adapters:
        save_adapter(policy, out / name, step=step, adapter=name)
    return out


def export_adapters(adapter_dir: Path, out: str | Path, *, merge: bool = False,
                    model: str | None = None, device: str = "cpu") -> Path:
    """A checkpoint's multi-adapter ``adapter/`` folder -> ``out/<name>`` PEFT folders."""
    from ..inference import models

    dirs = saved_adapter_dirs(adapter_dir)
    if merge:
        raise ExportError(f"--merge folds one adapter into the base, but {adapter_dir} holds "
                          f"adapters {', '.join(dirs)}; export them as PEFT folders instead")
    meta = read_adapter_meta(adapter_dir)
    base = model or meta.get("base_model")
    if not base:
        raise ExportError(f"{adapter_dir} does not name its base model; pass --model")
    configs = {name: lora_kwargs(d) for name, d in dirs.items()}
    policy = models.load(base, lora=configs.pop("default"), adapters=configs, device=device)
    for name, directory in dirs.items():
        load_adapter(policy, directory, adapter=name)
    return save_adapters(policy, out, step=meta.get("step"))


def add_cli(sub: Any) -> None:
    """``lightning-lab export --checkpoint DIR --out OUT [--merge]``."""
    p = sub.add_parser("export", help="write a checkpoint as a PEFT adapter folder or a merged model")
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint dir (step-N/) or the dir holding LATEST")
    p.add_argument("--out", required=True, help="folder to write (replaced atomically if it exists)")
    p.add_argument("--merge", action="store_true",
                   help="fold the adapter into the base weights: a full save_pretrained model + tokenizer")
    p.add_argument("--model", default=None,
                   help="base model (default: the one recorded in the checkpoint's adapter)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(handler=_export_cmd)


def _export_cmd(args: Any) -> int:
    out = export_checkpoint(args.checkpoint, args.out, merge=args.merge, model=args.model,
                            device=args.device)
    kind = "merged model" if args.merge else "PEFT adapter"
    print(f"wrote {kind} to {out}")
    return 0
