"""Merge throughput: ``modelfuse merge`` on four ~0.9 GB Llama-style checkpoints, against the I/O floor.

Builds (once, cached in the work folder) a Llama-style base model and three fine-tuned
variants as Hugging Face folders: config.json from transformers' ``LlamaConfig`` and
sharded float32 safetensors with exactly ``LlamaForCausalLM``'s state_dict names and
shapes (hidden 1024, intermediate 2816, 12 layers, vocab 32000: 0.88 GB each), written
tensor by tensor. A variant is base + dense noise (std 1e-3 of the tensor's scale) +
sparse large deltas (1% of entries, std 1e-2 of the scale), so that trimming and sign
election have real work to do.

Then, for every method, runs ``python -m modelfuse merge RECIPE.yaml -o OUT --force`` in
a subprocess (through a few lines of wrapper that write the child's own VmHWM at exit)
and records wall seconds of the whole command (start-up included), its peak RSS, its CPU
seconds (``os.wait4``) and the CPU seconds the rest of the machine used meanwhile (from
/proc/stat: noisy neighbours show there). Beside them, in the same run: the I/O floor (a
subprocess that imports torch, reads every tensor of all four models with safetensors'
``safe_open(...).get_tensor`` and writes one output of the same size with modelfuse's
streaming ``CheckpointWriter``, as the engine does), the RSS of a bare ``import torch``
and the start-up time of ``modelfuse --help``.

Cache: with root rights every case runs after ``sync; echo 3 > /proc/sys/vm/drop_caches``
("cold") and after a read of all inputs ("warm"); without them only warm. Before each
case it waits (``--quiet-wait``) until other processes leave the CPUs idle.

Run: ``.venv/bin/python benchmarks/merge_throughput.py [--methods ties,linear] [--repeat 3]``
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

# ----------------------------------------------------------------------------------- the models
LLAMA = {
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 12,
    "vocab_size": 32000,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "tie_word_embeddings": False,
}
INIT_STD = 0.02  # LlamaConfig.initializer_range: the scale of the weight matrices (norms: 1)
DENSE_STD = 1e-3  # dense fine-tuning noise, relative to the tensor's scale
SPARSE_FRACTION = 0.01  # share of entries that get a large delta
SPARSE_STD = 1e-2  # std of the large deltas, relative to the tensor's scale
SHARD_SIZE = "400MB"  # three input shards per model
MODELS = ("base", "ft1", "ft2", "ft3")
BUILD_VERSION = 1  # bump when the way models are generated changes

# ----------------------------------------------------------------------------------- the methods
METHODS: dict[str, dict] = {
    "linear": {"base": False, "models": 3, "parameters": {}, "model_parameters": {"weight": 1.0}},
    "task_arithmetic": {"base": True, "models": 3, "parameters": {}, "model_parameters": {"weight": 0.5}},
    "ties": {
        "base": True,
        "models": 3,
        "parameters": {},
        "model_parameters": {"weight": 1.0, "density": 0.3},
    },
    "dare_ties": {
        "base": True,
        "models": 3,
        "parameters": {},
        "model_parameters": {"weight": 1.0, "density": 0.5},
    },
    "slerp": {"base": True, "models": 1, "parameters": {"t": 0.5}, "model_parameters": {}},
    "breadcrumbs": {
        "base": True,
        "models": 3,
        "parameters": {},
        "model_parameters": {"weight": 1.0, "density": 0.9, "gamma": 0.01},
    },
    "della": {
        "base": True,
        "models": 3,
        "parameters": {},
        "model_parameters": {"weight": 1.0, "density": 0.5, "epsilon": 0.1},
    },
    "model_stock": {"base": True, "models": 3, "parameters": {}, "model_parameters": {}},
    # the same merges with equal magnitudes at the cut ordered as torch's CPU sort orders them
    # (mergekit's CPU output bit for bit) instead of by position (the default)
    "ties/sort": {
        "method": "ties",
        "base": True,
        "models": 3,
        "parameters": {"tie_break": "sort"},
        "model_parameters": {"weight": 1.0, "density": 0.3},
    },
    "breadcrumbs/sort": {
        "method": "breadcrumbs",
        "base": True,
        "models": 3,
        "parameters": {"tie_break": "sort"},
        "model_parameters": {"weight": 1.0, "density": 0.9, "gamma": 0.01},
    },
}

# ----------------------------------------------------------------------------------- targets
FLOOR_RATIO = 2.0  # every method within 2x the I/O floor ...
FLOOR_RATIO_SPECIAL = {"ties": 3.0}  # ... except TIES, within 3x
RSS_OVER_TORCH = 1e9  # bytes of peak RSS above a bare `import torch`
CLI_START = 1.0  # seconds for `modelfuse --help`
#: the merge's settings, spelled out so that the figures stay comparable if the defaults move:
#: torch on one core fewer than the machine's, gc frozen (the CLI's), output dropped from the
#: page cache behind the writer
MERGE_FLAGS = ["--force", "--threads", "auto", "--drop-cache"]

MiB = 2**20


def _seed(*parts: object) -> int:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def llama_layout():
    """``(config dict, {name: shape})`` of LlamaForCausalLM at the benchmark's size, from transformers."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**LLAMA)
    config.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    layout = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    data = config.to_dict()
    data["dtype"] = "float32"
    return data, layout


def build_models(root: Path) -> float:
    """Write base + ft1..ft3 under ``root`` unless a matching build is there; returns seconds spent."""
    stamp = root / "build.json"
    spec = {
        "version": BUILD_VERSION,
        "llama": LLAMA,
        "init_std": INIT_STD,
        "dense_std": DENSE_STD,
        "sparse_fraction": SPARSE_FRACTION,
        "sparse_std": SPARSE_STD,
        "shard_size": SHARD_SIZE,
    }
    if stamp.is_file() and json.loads(stamp.read_text()) == spec and all((root / m).is_dir() for m in MODELS):
        return 0.0
    import torch

    from modelfuse.io import CheckpointWriter

    start = time.perf_counter()
    stamp.unlink(missing_ok=True)
    config, layout = llama_layout()
    declared = {name: (shape, torch.float32) for name, shape in layout.items()}
    with contextlib.ExitStack() as stack:
        writers = {
            m: stack.enter_context(
                CheckpointWriter(root / m, max_shard_size=SHARD_SIZE, force=True, drop_cache=True)
            )
            for m in MODELS
        }
        for w in writers.values():
            w.declare(declared)
            w.write_json("config.json", config)
        for name, shape in layout.items():
            gen = torch.Generator().manual_seed(_seed("base", name))
            if name.endswith("norm.weight"):
                scale, base = 1.0, torch.ones(shape)
            else:
                scale, base = INIT_STD, torch.randn(shape, generator=gen).mul_(INIT_STD)
            writers["base"].add(name, base)
            n = base.numel()
            k = max(1, int(SPARSE_FRACTION * n))
            for m in MODELS[1:]:
                gen = torch.Generator().manual_seed(_seed(m, name))
                variant = torch.randn(shape, generator=gen).mul_(DENSE_STD * scale).add_(base)
                where = torch.randint(0, n, (k,), generator=gen)
                big = torch.randn(k, generator=gen).mul_(SPARSE_STD * scale)
                variant.view(-1).index_add_(0, where, big)
                writers[m].add(name, variant)
                del variant
    stamp.write_text(json.dumps(spec))
    return time.perf_counter() - start


def weight_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


# ----------------------------------------------------------------------------------- measuring
@dataclass
class Run:
    seconds: float
    rss: int  # peak RSS (VmHWM) of the child, bytes
    rc: int
    stdout: str
    stderr: str
    user: float = 0.0  # CPU seconds in user mode
    system: float = 0.0  # CPU seconds in the kernel
    others: float = 0.0  # CPU seconds the rest of the machine used meanwhile (noisy neighbours)


# Runs ``-m MODULE ARGS...`` or ``-c CODE ARGS...`` and, at exit, writes its own VmHWM to a file.
# (The child's ru_maxrss from wait4 is not used: Linux carries the parent's high-water mark over
# the fork/vfork + exec into it, so a child of a big parent would report the parent's peak.)
WRAP = textwrap.dedent(
    """
    import atexit, os, runpy, sys
    def _peak():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                with open(os.environ["MERGE_BENCH_PEAK"], "w") as f:
                    f.write(line.split()[1])
    atexit.register(_peak)
    kind, target, *rest = sys.argv[1:]
    if kind == "-m":
        sys.argv = [target, *rest]
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        sys.argv = ["-c", *rest]
        exec(compile(target, "<benchmark>", "exec"), {"__name__": "__main__"})
    """
)


CHILD_ENV = dict(os.environ)  # the children's environment (PYTHONPATH set by --snapshot)


def run_child(argv: list[str]) -> Run:
    """Run ``python -m MODULE ...`` / ``python -c CODE ...`` (``argv`` without the python); wall time and peak RSS."""
    with (
        tempfile.TemporaryFile("w+") as out,
        tempfile.TemporaryFile("w+") as err,
        tempfile.NamedTemporaryFile("r", suffix=".peak") as peak,
    ):
        env = {**CHILD_ENV, "MERGE_BENCH_PEAK": peak.name}
        busy = cpu_busy()
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", WRAP, *argv], stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's CPU times (its ru_maxrss is not used)
        seconds = time.perf_counter() - start
        others = cpu_busy() - busy - usage.ru_utime - usage.ru_stime
        proc.returncode = rc = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        text = Path(peak.name).read_text().strip()
        rss = int(text) * 1024 if text else 0
        return Run(seconds, rss, rc, out.read(), err.read(), usage.ru_utime, usage.ru_stime, max(0.0, others))


def cpu_busy() -> float:
    """CPU seconds the whole machine has spent busy (all CPUs; /proc/stat, steal included)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def wait_quiet(limit: float, threshold: float = 0.25) -> float:
    """Wait (up to ``limit`` s) until other processes use under ``threshold`` CPUs over 1 s; returns the wait."""
    start = time.perf_counter()
    while True:
        before = cpu_busy()
        time.sleep(1.0)
        if cpu_busy() - before < threshold or time.perf_counter() - start >= limit:
            return time.perf_counter() - start


def drop_caches() -> bool:
    """``sync; echo 3 > /proc/sys/vm/drop_caches``; False where that is not allowed."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


def page_cache_mib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Cached:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def warm_up(folders: list[Path]) -> None:
    """Read every file of ``folders`` once so that they sit in the page cache."""
    os.sync()  # write back the previous case's output first, so it does not overlap this case
    for folder in folders:
        for f in sorted(folder.iterdir()):
            if f.is_file():
                with open(f, "rb", buffering=0) as fh:
                    while fh.read(16 * MiB):
                        pass


def prepare(cache: str, folders: list[Path]) -> None:
    if cache == "cold":
        drop_caches()
    else:
        warm_up(folders)


FLOOR = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    start = time.perf_counter()
    import torch
    from safetensors import safe_open
    from modelfuse.io import DEFAULT_SHARD_SIZE, CheckpointWriter, open_checkpoint
    imported = time.perf_counter()
    *inputs, out = map(Path, sys.argv[1:])
    ref = open_checkpoint(inputs[0])  # names, shapes and dtypes only (headers)
    names = list(ref.keys())
    layout = {n: (tuple(ref.shape(n)), ref.dtype(n)) for n in names}
    ref.close()
    where = []
    for folder in inputs:
        handles = {}
        for f in sorted(folder.glob("*.safetensors")):
            h = safe_open(f, framework="pt")
            handles.update(dict.fromkeys(h.keys(), h))
        where.append(handles)
    read = 0
    # the write-behind on, as `modelfuse merge` writes by default (--drop-cache)
    with CheckpointWriter(out, max_shard_size=DEFAULT_SHARD_SIZE, force=True, drop_cache=True) as w:
        w.declare(layout)
        for name in names:
            for handles in where:
                t = handles[name].get_tensor(name)
                read += t.numel() * t.element_size()
            w.add(name, t)  # the last model's tensor stands in for a merged one
            del t
    done = time.perf_counter()
    print(json.dumps({"import_s": imported - start, "io_s": done - imported, "read": read}))
    """
)

BARE_TORCH = "import torch"


def write_recipe(path: Path, case: str, models: Path) -> list[Path]:
    """Write ``case``'s recipe (mergekit's YAML format) to ``path``; returns the model folders it reads."""
    import yaml

    spec = METHODS[case]
    chosen = [models / m for m in MODELS[1 : 1 + spec["models"]]]
    recipe: dict = {"merge_method": spec.get("method", case)}
    if spec["base"]:
        recipe["base_model"] = str(models / "base")
    recipe["models"] = [{"model": str(m), "parameters": dict(spec["model_parameters"])} for m in chosen]
    if spec["parameters"]:
        recipe["parameters"] = dict(spec["parameters"])
    recipe["dtype"] = "float32"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return ([models / "base"] if spec["base"] else []) + chosen


def check_output(out: Path, models: Path, expected_bytes: int) -> str:
    """A cheap sanity check of a merged folder: its size, and one tensor finite and near the base."""
    import torch
    from safetensors import safe_open

    size = weight_bytes(out)
    if size < expected_bytes or size > expected_bytes + 10 * MiB:
        return f"size {size} B, expected ~{expected_bytes} B"
    name = "model.layers.0.self_attn.q_proj.weight"

    def get(folder: Path) -> torch.Tensor:
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(f, framework="pt") as h:
                if name in h.keys():  # noqa: SIM118  (safe_open has no __contains__)
                    return h.get_tensor(name)
        raise KeyError(name)

    merged, base = get(out), get(models / "base")
    if not bool(torch.isfinite(merged).all()):
        return "non-finite values"
    rel = float((merged - base).norm() / base.norm())
    if not 0 < rel < 0.05:
        return f"|merged - base| / |base| = {rel:.3g}"
    return "ok"


@dataclass
class Result:
    name: str
    cache: str
    seconds: list[float] = field(default_factory=list)
    loop: list[float] = field(default_factory=list)  # merge loop as the CLI reports it
    rss: list[int] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # user + system CPU seconds of the child
    others: list[float] = field(default_factory=list)  # other processes' CPU seconds meanwhile
    moved: int = 0  # bytes read + written
    note: str = ""

    @property
    def s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def peak(self) -> int:
        return max(self.rss)


def package_folder() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("modelfuse")
    return Path(next(iter(spec.submodule_search_locations)))


def source_state(files: Path | None = None) -> tuple[str, str]:
    """(git commit of the modelfuse source, ``+dirty`` when edited; fingerprint of ``files``' .py files)."""
    folder = package_folder()
    digest = hashlib.sha256()
    for f in sorted((files or folder).rglob("*.py")):
        digest.update(f"{f.relative_to(files or folder)}:{f.read_bytes().hex()}".encode())
    git = ["git", "-C", str(folder)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run([*git, "status", "--porcelain", "--", "."], capture_output=True, text=True)
    commit = head.stdout.strip() or "unknown commit"
    if dirty.stdout.strip():
        commit += "+dirty"
    return commit, digest.hexdigest()[:12]


def available_cases(cases: list[str], env: dict[str, str]) -> tuple[list[str], list[str]] | str:
    """Split ``cases`` into (runnable, not available): method registered and parameters known."""
    code = textwrap.dedent(
        """
        import json, modelfuse.merge as m
        out = {}
        for name in m.list_methods():
            method = m.get_method(name)
            fields = {**method.shared.model_fields, **method.per_model.model_fields}
            out[name] = sorted(set(fields) | {f.alias for f in fields.values() if f.alias})
        print(json.dumps(out))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"rc {out.returncode}"
    found = json.loads(out.stdout.strip().splitlines()[-1])
    runnable, missing = [], []
    for case in cases:
        spec = METHODS[case]
        params = found.get(spec.get("method", case))
        wanted = set(spec["parameters"]) | set(spec["model_parameters"])
        (runnable if params is not None and wanted <= set(params) else missing).append(case)
    return runnable, missing


def snapshot_source(work: Path) -> Path:
    """Copy the modelfuse package into ``work``/snapshot; children import it from there (PYTHONPATH)."""
    target = work / "snapshot"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(package_folder(), target / "modelfuse", ignore=shutil.ignore_patterns("__pycache__"))
    return target


def profile_method(method: str, work: Path, models: Path) -> None:
    """cProfile one merge (main thread; reads run on the executor's threads) and print the top functions."""
    import pstats

    recipe = work / "recipes" / f"{method.replace('/', '-')}.yaml"
    write_recipe(recipe, method, models)
    slug = method.replace("/", "-")
    out, prof = work / "out" / f"profile-{slug}", work / f"profile-{slug}.prof"
    shutil.rmtree(out, ignore_errors=True)
    warm_up([models / m for m in MODELS])
    argv = [sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "modelfuse"]
    start = time.perf_counter()
    rc = subprocess.run([*argv, "merge", str(recipe), "-o", str(out), *MERGE_FLAGS], env=CHILD_ENV).returncode
    seconds = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    print(f"\nprofile of {method} (warm cache, {seconds:.1f} s under cProfile, rc {rc}): {prof}")
    for key in ("tottime", "cumulative"):
        print(f"-- top 25 by {key}")
        pstats.Stats(str(prof)).sort_stats(key).print_stats(25)


# ----------------------------------------------------------------------------------- the run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "modelfuse-merge-bench",
        help="where models (kept between runs), recipes and outputs go (default: %(default)s)",
    )
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: all)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per case; the median is reported")
    parser.add_argument(
        "--cache",
        choices=("both", "cold", "warm"),
        default="both",
        help="page cache before each case: dropped (cold, needs root), read in (warm), or both (default)",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=60.0,
        metavar="S",
        help="before each case wait up to S seconds for other processes to go quiet (default 60; 0: never)",
    )
    parser.add_argument(
        "--snapshot",
        action="store_true",
        help="run the merges on a copy of the modelfuse source taken at the start (edits during the run "
        "then cannot mix versions)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--profile", metavar="METHOD", help="afterwards, cProfile one merge of METHOD")
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; the benchmark knows {', '.join(METHODS)}")

    work = args.workdir.resolve()
    models = work / "models"
    for sub in ("models", "recipes", "out"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    built = build_models(models)
    folders = [models / m for m in MODELS]
    size = weight_bytes(models / "base")
    print(
        f"models: {len(MODELS)} x {size / 1e9:.3f} GB float32 in {models} "
        + (f"(built in {built:.1f} s)" if built else "(cached)")
    )

    modes = ["cold", "warm"] if args.cache == "both" else [args.cache]
    if "cold" in modes:
        before = page_cache_mib()
        warm_up(folders)
        filled = page_cache_mib()
        ok = drop_caches()
        after = page_cache_mib()
        print(
            f"drop_caches: {'works' if ok else 'not permitted'} (page cache {before:.0f} -> read inputs "
            f"{filled:.0f} -> dropped {after:.0f} MiB)"
        )
        if not ok:
            print("running warm only: every case after a read of all inputs")
            modes = ["warm"]

    snap = snapshot_source(work) if args.snapshot else None
    commit, fingerprint = source_state(snap / "modelfuse" if snap else None)
    print(f"modelfuse source: {commit}, files fingerprint {fingerprint}")
    if snap is not None:
        CHILD_ENV["PYTHONPATH"] = os.pathsep.join(filter(None, [str(snap), os.environ.get("PYTHONPATH")]))
        print(f"children import a copy of that source: {snap / 'modelfuse'}")
    found = available_cases(methods, CHILD_ENV)
    if isinstance(found, str):
        sys.exit(f"cannot list the merge methods: {found}")
    runnable, missing = found
    print(f"methods: {', '.join(runnable) or '(none)'}; not available: {', '.join(missing) or '(none)'}")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    # bare import torch and CLI start-up
    base_rss: dict[str, Result] = {}
    startup: dict[str, Result] = {}
    for cache in modes:
        base_rss[cache] = Result("import torch", cache)
        startup[cache] = Result("modelfuse --help", cache)
        if cache == "warm":  # an unmeasured first run brings torch's libraries into the cache
            run_child(["-c", BARE_TORCH])
            run_child(["-m", "modelfuse", "--help"])
        for _ in range(max(args.repeat, 3)):
            prepare(cache, [])
            r = run_child(["-c", BARE_TORCH])
            base_rss[cache].seconds.append(r.seconds)
            base_rss[cache].rss.append(r.rss)
            base_rss[cache].cpu.append(r.user + r.system)
            base_rss[cache].others.append(r.others)
            prepare(cache, [])
            r = run_child(["-m", "modelfuse", "--help"])
            if r.rc != 0:
                sys.exit(f"modelfuse --help failed (rc {r.rc}): {r.stderr.strip()[-500:]}")
            startup[cache].seconds.append(r.seconds)
            startup[cache].rss.append(r.rss)
            startup[cache].cpu.append(r.user + r.system)
            startup[cache].others.append(r.others)

    results: dict[str, list[Result]] = {cache: [] for cache in modes}
    floors: dict[str, Result] = {}
    order = ["(I/O floor)", *runnable]
    total_cases = len(order) * len(modes) * args.repeat
    done = 0
    for _ in range(args.repeat):
        for cache in modes:
            for name in order:
                done += 1
                slug = name.replace("/", "-") if name in METHODS else "floor"
                out = work / "out" / slug
                shutil.rmtree(out, ignore_errors=True)
                if name in METHODS:
                    recipe = work / "recipes" / f"{slug}.yaml"
                    inputs = write_recipe(recipe, name, models)
                    argv = ["-m", "modelfuse", "merge", str(recipe), "-o", str(out), *MERGE_FLAGS]
                else:
                    inputs = folders
                    argv = ["-c", FLOOR, *map(str, folders), str(out)]
                prepare(cache, folders)
                waited = wait_quiet(args.quiet_wait) if args.quiet_wait > 0 else 0.0
                run = run_child(argv)
                if name in METHODS:
                    res = next((r for r in results[cache] if r.name == name), None)
                    if res is None:
                        res = Result(name, cache)
                        results[cache].append(res)
                else:
                    res = floors.setdefault(cache, Result(name, cache))
                res.moved = sum(weight_bytes(f) for f in inputs) + size
                if run.rc != 0:
                    tail = (run.stderr.strip() or run.stdout.strip()).splitlines()[-1:] or [""]
                    res.note = f"failed (rc {run.rc}): {tail[0][:200]}"
                else:
                    res.seconds.append(run.seconds)
                    res.rss.append(run.rss)
                    res.cpu.append(run.user + run.system)
                    res.others.append(run.others)
                    if name in METHODS:
                        m = re.search(r"in ([0-9.]+) s\s*$", run.stdout.strip())
                        if m:
                            res.loop.append(float(m.group(1)))
                        res.note = check_output(out, models, size)
                    else:
                        res.loop.append(json.loads(run.stdout.strip().splitlines()[-1])["io_s"])
                        res.note = "ok"
                shutil.rmtree(out, ignore_errors=True)
                print(
                    f"[{done}/{total_cases}] {cache:4s} {name:16s} {run.seconds:7.2f} s  "
                    f"peak RSS {run.rss / MiB:6.0f} MiB  CPU {run.user:5.1f} user {run.system:5.1f} sys  "
                    f"others {run.others:5.1f} CPU s  (waited {waited:.0f} s)  rc {run.rc}  {res.note}",
                    flush=True,
                )
                if run.rc != 0 and name not in METHODS:
                    sys.exit(f"the I/O floor failed: {run.stderr.strip()[-2000:]}")

    report(modes, results, floors, base_rss, startup, missing, args)
    now = source_state()
    if now[1] != fingerprint:
        print(
            f"\nnote: the modelfuse source changed during the run ({commit} {fingerprint} -> {now[0]} {now[1]})"
            + (": the merges ran on the copy taken at the start" if snap else ": the figures mix versions")
        )
    if args.profile:
        profile_method(args.profile, work, models)


def _row(label: str, res: Result, floor: Result, torch_rss: int) -> str:
    med = statistics.median
    loop = f"{med(res.loop):.2f}" if res.loop else "-"
    return (
        f"| {label} | {res.s:.2f} | {min(res.seconds):.2f} | {res.s / floor.s:.2f} | {loop} "
        f"| {med(res.cpu):.1f} | {med(res.others):.1f} | {res.peak / MiB:.0f} | {(res.peak - torch_rss) / MiB:.0f} "
        f"| {res.moved / res.s / 1e9:.2f} | {res.note} |"
    )


def report(modes, results, floors, base_rss, startup, missing, args) -> None:
    rows_json = []
    print()
    print(
        f"python {sys.version.split()[0]}; load average now {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    for cache in modes:
        floor, torch_rss = floors[cache], base_rss[cache].peak
        cli = startup[cache]
        print(
            f"\n### {cache} page cache (median of {args.repeat} run(s) per case)\n\n"
            f"bare `import torch`: {base_rss[cache].s:.2f} s, peak RSS {torch_rss / MiB:.0f} MiB; "
            f"`modelfuse --help`: {cli.s:.2f} s (min {min(cli.seconds):.2f}, max {max(cli.seconds):.2f})\n"
        )
        print(
            "| method | seconds | min s | x floor | merge loop s | CPU s | others' CPU s | peak RSS MiB "
            "| over import torch MiB | GB/s | check |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        print(_row("I/O floor (read 4 models, write 1)", floor, floor, torch_rss))
        verdicts = []
        for res in results[cache]:
            if not res.seconds:
                print(f"| {res.name} | - | - | - | - | - | - | - | - | - | {res.note} |")
                verdicts.append((f"{res.name} ran", False, res.note))
                continue
            print(_row(res.name, res, floor, torch_rss))
            ratio, over = res.s / floor.s, res.peak - torch_rss
            limit = FLOOR_RATIO_SPECIAL.get(METHODS[res.name].get("method", res.name), FLOOR_RATIO)
            verdicts.append((f"{res.name} within {limit:g}x the I/O floor", ratio <= limit, f"{ratio:.2f}x"))
            verdicts.append(
                (
                    f"{res.name} peak RSS <= 1 GB over import torch",
                    over <= RSS_OVER_TORCH,
                    f"{over / 1e9:.2f} GB",
                )
            )
            if res.note != "ok":
                verdicts.append((f"{res.name} output check", False, res.note))
            rows_json.append({"method": res.name, "cache": cache, **_as_json(res), "ratio": ratio})
        for name in missing:
            print(f"| {name} | not available | | | | | | | | | |")
        verdicts.append((f"modelfuse --help under {CLI_START:g} s", cli.s < CLI_START, f"{cli.s:.2f} s"))
        print(f"\ntargets ({cache} cache):")
        for what, ok, value in verdicts:
            print(f"  {'PASS' if ok else 'FAIL'}  {what}: {value}")
        rows_json.append(
            {
                "cache": cache,
                "floor": _as_json(floor),
                "import_torch": _as_json(base_rss[cache]),
                "modelfuse_help": _as_json(cli),
            }
        )
    if missing:
        print(f"\nnot available (not registered): {', '.join(missing)}")
    if args.json:
        args.json.write_text(json.dumps(rows_json, indent=2))


def _as_json(res: Result) -> dict:
    return {
        "seconds": res.seconds,
        "loop_seconds": res.loop,
        "peak_rss": res.rss,
        "cpu_seconds": res.cpu,
        "others_cpu_seconds": res.others,
        "bytes_moved": res.moved,
        "check": res.note,
    }


if __name__ == "__main__":
    main()
