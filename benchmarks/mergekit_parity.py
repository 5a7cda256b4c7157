"""modelfuse against mergekit on the same recipes: max |diff| and bit equality per method.

Writes a small synthetic Llama-style family (a base and three fine-tunes, safetensors and
config.json), runs every recipe through mergekit (in a subprocess, from the environment
given with --mergekit-path, e.g. a ``pip install --target`` of mergekit==0.1.5) and through
``modelfuse.merge``, and prints one row per recipe. mergekit is not a dependency of
modelfuse; without it the script says how to get it and stops.

    pip install --no-deps --target /tmp/mk-site mergekit==0.1.5 accelerate immutables peft
    python benchmarks/mergekit_parity.py --mergekit-path /tmp/mk-site
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

HIDDEN, INTER, VOCAB, LAYERS, HEADS = 64, 128, 256, 2, 4

#: (label, merge_method, models' parameters (one dict per fine-tune), top-level parameters, with base)
RECIPES = [
    ("linear", "linear", [{"weight": 1.0}, {"weight": 0.5}, {"weight": 0.25}], {}, False),
    ("linear + base_model", "linear", [{"weight": 1.0}, {"weight": 0.5}, {"weight": 0.25}], {"weight": 0.75}, True),
    ("linear + base, no weight", "linear", [{"weight": 1.0}, {"weight": 0.5}, {"weight": 0.25}], {}, True),
    ("task_arithmetic", "task_arithmetic", [{"weight": 1.0}, {"weight": 0.5}, {"weight": 0.25}], {}, True),
    ("ties (index)", "ties", [{"weight": 1.0, "density": 0.5}] * 3, {}, True),
    ("ties (sort)", "ties", [{"weight": 1.0, "density": 0.5}] * 3, {"tie_break": "sort"}, True),
    ("breadcrumbs (sort)", "breadcrumbs", [{"weight": 1.0, "density": 0.5, "gamma": 0.05}] * 3, {"tie_break": "sort"}, True),
    ("breadcrumbs_ties (sort)", "breadcrumbs_ties", [{"weight": 1.0, "density": 0.5, "gamma": 0.05}] * 3, {"tie_break": "sort"}, True),
    ("dare_linear (density 1)", "dare_linear", [{"weight": 1.0}, {"weight": 0.5}, {"weight": 0.25}], {}, True),
    ("dare_ties (density 1)", "dare_ties", [{"weight": 1.0}, {"weight": 0.5}, {"weight": 0.25}], {}, True),
    ("della (density 1)", "della", [{"weight": 1.0}, {"weight": 0.5}, {"weight": 0.25}], {}, True),
    ("della_linear (density 1)", "della_linear", [{"weight": 1.0}, {"weight": 0.5}, {"weight": 0.25}], {}, True),
    ("sce + weight: 1.0", "sce", [{"weight": 1.0}] * 3, {"select_topk": 0.5}, True),
    ("model_stock + weight: 1.0", "model_stock", [{"weight": 1.0}] * 3, {}, True),
    ("karcher", "karcher", [{}] * 3, {}, False),
    ("karcher + base_model", "karcher", [{}] * 3, {}, True),
    ("multislerp", "multislerp", [{"weight": 1.0}, {"weight": 0.5}, {"weight": 0.25}], {}, True),
    ("nuslerp", "nuslerp", [{"weight": 1.0}, {"weight": 0.5}], {}, True),
    ("slerp", "slerp", [{}], {"t": 0.3}, True),
    ("nearswap", "nearswap", [{}], {"t": 0.001}, True),
    ("arcee_fusion", "arcee_fusion", [{}], {}, True),
    ("ram", "ram", [{}] * 3, {"epsilon": 0.01}, True),
    ("ramplus_tl", "ramplus_tl", [{}] * 3, {"epsilon": 0.01}, True),
    ("passthrough", "passthrough", [{}], {}, False),
]

MERGEKIT = """
import sys, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
config = MergeConfiguration.model_validate(yaml.safe_load(open(sys.argv[1])))
run_merge(config, sys.argv[2], options=MergeOptions(copy_tokenizer=False, lazy_unpickle=False))
"""


def llama(seed: int, base: dict | None = None, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """A Llama-style state dict; a fine-tune is base + scale * noise on a bf16-like coarse grid."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * scale

    sd = {"model.embed_tokens.weight": rnd(VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"self_attn.{name}.weight"] = rnd(HIDDEN, HIDDEN)
        sd[p + "mlp.gate_proj.weight"] = rnd(INTER, HIDDEN)
        sd[p + "mlp.up_proj.weight"] = rnd(INTER, HIDDEN)
        sd[p + "mlp.down_proj.weight"] = rnd(HIDDEN, INTER)
        sd[p + "input_layernorm.weight"] = 1 + rnd(HIDDEN)
        sd[p + "post_attention_layernorm.weight"] = 1 + rnd(HIDDEN)
    sd["model.norm.weight"] = 1 + rnd(HIDDEN)
    sd["lm_head.weight"] = rnd(VOCAB, HIDDEN)
    if base is not None:
        sd = {k: (base[k] + v).to(torch.bfloat16).float() for k, v in sd.items()}  # deltas on a coarse grid: ties
    return sd


def write(folder: Path, sd: dict) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS,
        "vocab_size": VOCAB,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def recipe(method: str, per_model: list[dict], top: dict, with_base: bool, paths: dict) -> dict:
    out: dict = {
        "merge_method": method,
        "models": [{"model": paths[f"ft{i + 1}"], "parameters": p} for i, p in enumerate(per_model)],
        "dtype": "float32",
    }
    if top:
        out["parameters"] = top
    if with_base:
        out["base_model"] = paths["base"]
    return out


def read(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mergekit-path", required=True, help="a folder with mergekit 0.1.5 importable (PYTHONPATH)")
    parser.add_argument("--only", help="run only recipes whose label contains this")
    args = parser.parse_args()
    import yaml

    from modelfuse.merge import merge

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([args.mergekit_path, os.environ.get("PYTHONPATH", "")])}
    check = subprocess.run([sys.executable, "-c", "import mergekit.merge"], env=env, capture_output=True, text=True)
    if check.returncode != 0:
        print(f"mergekit is not importable from {args.mergekit_path}:\n{check.stderr[-2000:]}", file=sys.stderr)
        print(__doc__, file=sys.stderr)
        return 1
    version = subprocess.run(
        [sys.executable, "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
        env=env, capture_output=True, text=True,
    ).stdout.strip()
    print(f"mergekit {version}, torch {torch.__version__}; {LAYERS} layers, hidden {HIDDEN}, float32")
    print(f"{'recipe':<28} {'tensors':>7} {'bit-equal':>9} {'max |diff|':>11} {'entries differing':>18}")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        base = llama(0)
        paths = {"base": write(tmp / "base", base)}
        for i in (1, 2, 3):
            paths[f"ft{i}"] = write(tmp / f"ft{i}", llama(i, base, scale=0.02))
        for label, method, per_model, top, with_base in RECIPES:
            if args.only and args.only not in label:
                continue
            data = recipe(method, per_model, top, with_base, paths)
            mk_data = json.loads(json.dumps(data))
            mk_data.get("parameters", {}).pop("tie_break", None)  # modelfuse's own parameter
            if not mk_data.get("parameters"):
                mk_data.pop("parameters", None)
            slug = label.replace(" ", "_").replace(":", "").replace("(", "").replace(")", "").replace("+", "")
            (tmp / f"{slug}.yaml").write_text(yaml.safe_dump(mk_data))
            mk_out = tmp / f"mk_{slug}"
            run = subprocess.run(
                [sys.executable, "-c", MERGEKIT, str(tmp / f"{slug}.yaml"), str(mk_out)],
                env=env, capture_output=True, text=True,
            )
            if run.returncode != 0:
                print(f"{label:<28} mergekit failed: {run.stderr.strip().splitlines()[-1][:120]}")
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    mf_out = merge(data, tmp / f"mf_{slug}", progress=False)
                except Exception as exc:  # a row per recipe, whatever happens
                    print(f"{label:<28} modelfuse failed: {exc}"[:200])
                    continue
            a, b = read(mk_out), read(mf_out)
            if set(a) != set(b):
                print(f"{label:<28} tensor names differ: {sorted(set(a) ^ set(b))[:4]}")
                continue
            equal = sum(torch.equal(a[k], b[k]) for k in a)
            diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
            differing = sum(int((a[k] != b[k]).sum()) for k in a)
            total = sum(a[k].numel() for k in a)
            print(f"{label:<28} {len(a):>7} {equal == len(a)!s:>9} {diff:>11.3g} {differing:>9} / {total}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
