"""Run a merge plan tensor by tensor: read ahead on threads, compute, write each result in place.

Memory is bounded by the tensors in flight (a read-ahead budget in bytes), never by the
models' size: inputs are mapped (safetensors) or read (other formats) one tensor at a time,
and the writer streams each result to its declared offset in the output shard.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import os
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from modelfuse._memory import release_free_memory
from modelfuse.errors import ConfigError, FusionError
from modelfuse.io import DEFAULT_SHARD_SIZE, CheckpointWriter
from modelfuse.io.checkpoint import CONFIG_FILES, TOKENIZER_FILES
from modelfuse.merge.methods import _kernels
from modelfuse.merge.methods._base import workspace
from modelfuse.merge.plan import MergePlan, TensorTask
from modelfuse.progress import progress as progress_bar


class MergeComputeError(FusionError):
    """A merge method produced an unusable result (non-finite values) or failed on a tensor."""


def tensor_seed(seed: int, name: str) -> int:
    """The seed of one output tensor's random draws: reproducible per (seed, tensor name)."""
    digest = hashlib.sha256(f"{int(seed)}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class BufferPool:
    """Reusable buffers (uint8, by exact size) for reads of non-safetensors inputs, method
    outputs and large scratch arrays: a streaming merge handles tensors of a few sizes over
    and over, and memory the process already holds costs no page faults, no zeroing by the
    kernel and no unmapping. At most ``cap`` bytes lie idle; beyond that the least recently
    returned buffers are freed. Thread-safe (readers and the main thread take and give).
    """

    def __init__(self, cap: int):
        self.cap = cap
        self._idle: OrderedDict[int, torch.Tensor] = OrderedDict()  # id -> buffer, oldest first
        self._idle_bytes = 0
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            for key, buf in self._idle.items():
                if buf.numel() == nbytes:
                    del self._idle[key]
                    self._idle_bytes -= nbytes
                    return buf
            # a new size: idle buffers of other sizes make room first (e.g. before the large
            # embedding matrices at the end, the layers' buffers are not needed any more)
            while self._idle and self._idle_bytes + nbytes > self.cap:
                _, old = self._idle.popitem(last=False)
                self._idle_bytes -= old.numel()
        return torch.empty(nbytes, dtype=torch.uint8)

    def give(self, buf: torch.Tensor) -> None:
        with self._lock:
            self._idle[id(buf)] = buf
            self._idle_bytes += buf.numel()
            while self._idle_bytes > self.cap and self._idle:
                _, old = self._idle.popitem(last=False)
                self._idle_bytes -= old.numel()


Loaded = tuple[dict[tuple[str, str], torch.Tensor], list[torch.Tensor]]


def _load(plan: MergePlan, task: TensorTask, pool: BufferPool | None = None) -> Loaded:
    """The task's inputs: safetensors memory-mapped (no copy; the pages are faulted in here,
    on a reader thread), other formats read into pooled buffers (returned too, to be given
    back after use)."""
    tensors, buffers = {}, []
    for pair in task.inputs:
        model = plan.models[pair[0]]
        if pool is None:
            tensors[pair] = model.get(pair[1])
            continue
        if model.format == "safetensors":
            tensors[pair] = model.map(pair[1])
            continue
        buf = pool.take(model.nbytes(pair[1]))
        tensors[pair] = model.get(pair[1], into=buf)
        buffers.append(buf)
    return tensors, buffers


def _shares_memory(result: torch.Tensor, buffers: list[torch.Tensor]) -> bool:
    if not buffers or result.numel() == 0:
        return False
    start = result.untyped_storage().data_ptr()
    return any(b.numel() and b.data_ptr() <= start < b.data_ptr() + b.numel() for b in buffers)


def compute(
    task: TensorTask, inputs: dict[tuple[str, str], torch.Tensor], seed: int, device: torch.device
) -> torch.Tensor:
    """One output tensor from its loaded inputs, on ``device``; returned on the CPU in the output dtype."""
    if task.copy_from is not None:
        return inputs[task.copy_from].to(task.out_dtype)
    xs = [inputs[p].to(device=device, dtype=task.compute_dtype) for p in task.xs]
    base = inputs[task.base].to(device=device, dtype=task.compute_dtype) if task.base else None
    generator = None
    if task.method.randomized:
        generator = torch.Generator(device=device).manual_seed(tensor_seed(seed, task.out))
    try:
        out = task.method(xs, base, models=task.per_model, generator=generator, **task.shared)
    except FusionError as exc:
        raise type(exc)(f"tensor {task.out!r}: {exc}") from None
    # one reduction first: a NaN or inf anywhere makes the sum non-finite (an overflowing sum of
    # finite values is told apart by the exact check)
    if (
        out.is_floating_point()
        and not bool(torch.isfinite(out.sum()))
        and (bad := int((~torch.isfinite(out)).sum()))
    ):
        raise MergeComputeError(
            f"merge method {task.method.name!r} gave {bad} non-finite value(s) for tensor {task.out!r} "
            f"(parameters: {task.shared or {}}, per model: {task.per_model}); check the inputs for "
            "NaN/inf and the parameters (e.g. a zero normalising weight)"
        )
    return out.to(device="cpu", dtype=task.out_dtype)


def _needs_global_trim(task: TensorTask) -> bool:
    return task.copy_from is None and task.shared.get("trim") == "global" and task.base is not None


def global_trim_thresholds(plan: MergePlan, bins: int = 4096) -> list[float]:
    """Each model's magnitude cut over its whole task vector, for TIES with ``trim: global``.

    Model i keeps sum_t floor(d_i,t n_t) entries of |tau_i| over all tensors t (Yadav et al.
    2023 trim the task vector as a whole). Found exactly in three streaming passes over the
    inputs, holding one tensor at a time: the largest |tau|, a histogram of |tau| to find the
    bin holding the cut, then the exact order statistic among the values in that bin.
    """
    tasks = [t for t in plan.tasks if _needs_global_trim(t)]
    n_models = max(len(t.xs) for t in tasks)

    def deltas():
        for task in tasks:
            base = plan.models[task.base[0]].get(task.base[1]).to(torch.float32)
            for i, (m, n) in enumerate(task.xs):
                yield task, i, (plan.models[m].get(n).to(torch.float32) - base).abs().reshape(-1)

    keep = [0] * n_models
    top = [0.0] * n_models
    for task, i, mag in deltas():
        keep[i] += max(0, int(task.per_model[i].get("density", 1.0) * mag.numel()))
        top[i] = max(top[i], float(mag.max()) if mag.numel() else 0.0)

    def bin_of(mag: torch.Tensor, i: int) -> torch.Tensor:
        return (mag.double() * (bins / top[i])).floor().clamp_(max=bins - 1).long()

    hist = [torch.zeros(bins, dtype=torch.float64) for _ in range(n_models)]
    for _, i, mag in deltas():
        if top[i] > 0:
            hist[i] += torch.bincount(bin_of(mag, i), minlength=bins).double()
    cut_bin, above = [], []
    for i in range(n_models):
        from_top = hist[i].flip(0).cumsum(0)  # entries in bins >= b, counted from the highest bin
        b = int(torch.searchsorted(from_top, float(max(keep[i], 1))))
        b = min(b, bins - 1)
        cut_bin.append(bins - 1 - b)
        above.append(int(from_top[b - 1]) if b > 0 else 0)
    inside: list[list[torch.Tensor]] = [[] for _ in range(n_models)]
    for _, i, mag in deltas():
        if top[i] > 0:
            inside[i].append(mag[bin_of(mag, i) == cut_bin[i]])
    thresholds = []
    for i in range(n_models):
        values = torch.cat(inside[i]) if inside[i] else torch.empty(0)
        need = max(keep[i], 1) - above[i]
        if values.numel() == 0 or top[i] == 0:
            thresholds.append(0.0)
            continue
        need = min(max(need, 1), values.numel())
        thresholds.append(float(torch.topk(values, need).values[-1]))
    for task in tasks:
        for i in range(len(task.xs)):
            task.per_model[i] = {**task.per_model[i], "threshold": thresholds[i]}
    return thresholds


def run_tasks(
    plan: MergePlan,
    sink: Callable[[str, torch.Tensor], Any],
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    read_ahead_bytes: int = 256 * 2**20,
    threads: int = 4,
    progress: bool | None = None,
    reuse_results: bool = False,
    torch_threads: int | str | None = None,
    freeze_gc: bool = False,
) -> None:
    """Compute every task of ``plan`` in order and hand each result to ``sink(name, tensor)``.

    Reads for the next tasks run on ``threads`` threads while the current one computes,
    up to ``read_ahead_bytes`` of inputs in flight (always at least one task ahead).
    ``reuse_results``: the sink is done with a result when it returns (it copies it out,
    e.g. into a file), so the memory of results and of the methods' scratch arrays comes
    from a pool of reused buffers (see ``methods._base.new_empty``).

    Process-wide settings are left alone unless asked for (a library call should not change
    its caller's process): ``torch_threads`` sets ``torch.set_num_threads`` for the run
    (``"auto"``: one core fewer than the process may use, on CPU; None: unchanged), and
    ``freeze_gc`` leaves the objects that exist at the start out of garbage collections
    (``gc.freeze``) for the run; both are restored afterwards. The command line asks for
    both (``modelfuse merge --threads``).
    """
    threads_for_torch = resolve_torch_threads(torch_threads)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but torch sees no CUDA GPU; use --device cpu")
    tasks = plan.tasks
    if any(_needs_global_trim(t) for t in tasks):
        global_trim_thresholds(plan)

    sizes = [sum(plan.models[m].nbytes(n) for m, n in t.inputs) for t in tasks]
    buffers = BufferPool(cap=read_ahead_bytes // 4)

    with (
        _quiet_runtime(dev, threads_for_torch, freeze_gc),
        ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="modelfuse-read") as pool,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="modelfuse-write") as writer,
        progress_bar("merge", total=plan.nbytes, unit="bytes", show=progress) as bar,
    ):
        writes: deque[tuple[Future, list[torch.Tensor]]] = deque()  # results being written, oldest first
        pending: deque[tuple[TensorTask, Future, int]] = deque()
        held = 0  # input bytes loaded or loading, the task being computed included
        nxt = 0
        try:
            for _ in range(len(tasks)):
                # read ahead within the budget; a task bigger than the budget is read alone
                while nxt < len(tasks) and (held == 0 or held + sizes[nxt] <= read_ahead_bytes):
                    size = sizes[nxt]
                    pending.append((tasks[nxt], pool.submit(_load, plan, tasks[nxt], buffers), size))
                    held += size
                    nxt += 1
                task, future, size = pending.popleft()
                if size > read_ahead_bytes:  # a large tensor is read alone: the peak comes now
                    release_free_memory()
                inputs, used = future.result()
                taken: list[torch.Tensor] = []  # the method's output and scratch memory, pooled

                def take(nbytes: int, taken: list[torch.Tensor] = taken) -> torch.Tensor:
                    taken.append(buffers.take(nbytes))
                    return taken[-1]

                with workspace(take) if reuse_results else contextlib.nullcontext():
                    result = compute(task, inputs, seed, dev)
                if _shares_memory(result, used):  # e.g. a copied tensor: the buffer goes back to the pool
                    result = result.clone()
                del inputs
                in_result = [buf for buf in taken if _shares_memory(result, [buf])]
                for buf in used + [buf for buf in taken if not any(buf is r for r in in_result)]:
                    buffers.give(buf)
                held -= size
                # the sink (a file write) runs beside the next compute; two results at most in flight
                while len(writes) >= 2:
                    _finish(writes.popleft(), buffers)
                writes.append((writer.submit(sink, task.out, result), in_result))
                del result
                bar.advance(task.nbytes)
            while writes:
                _finish(writes.popleft(), buffers)
        finally:
            for _, future, _ in pending:
                future.cancel()
            for future, _ in writes:
                future.cancel()


def resolve_torch_threads(value: int | str | None) -> int | str | None:
    """Check a ``torch_threads`` setting: None, ``"auto"`` or a whole number of at least 1 (or its text)."""
    if value is None or value == "auto":
        return value
    number = 0
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and value.strip().isdigit():
        number = int(value)
    if number < 1:
        raise ConfigError(
            f"invalid number of torch threads {value!r}: expected 'auto' or a whole number of at least 1"
        )
    return number


@contextlib.contextmanager
def _quiet_runtime(dev: torch.device, torch_threads: int | str | None, freeze_gc: bool) -> Iterator[None]:
    """What the merge loop runs in, when the caller asks for it (the command line does).

    ``torch_threads="auto"``: torch computes on one core fewer than the process may use (CPU
    only): the reader and writer threads need one, and torch's idle OpenMP workers
    spin-wait for the next operation, which on a small machine takes the CPU from them (a
    quarter of a 2-core linear merge's samples were spinning). ``freeze_gc``: the objects
    that exist at the start (imports: about a million) are left out of garbage
    collections, which otherwise scan them again and again as the loop allocates small
    objects. Both are undone at the end."""
    threads = torch.get_num_threads()
    if torch_threads == "auto":
        if dev.type == "cpu":
            torch.set_num_threads(max(1, min(threads, _kernels.cores() - 1)))
    elif torch_threads is not None:
        torch.set_num_threads(int(torch_threads))
    frozen = freeze_gc and not gc.get_freeze_count()  # an outer freeze is the caller's to undo
    if frozen:
        gc.freeze()
    try:
        yield
    finally:
        if frozen:
            gc.unfreeze()
        if torch_threads is not None:
            torch.set_num_threads(threads)


def _finish(write: tuple[Future, list[torch.Tensor]], buffers: BufferPool) -> None:
    """Wait for a result's write, then give the pooled memory it lived in back."""
    future, memory = write
    future.result()
    for buf in memory:
        buffers.give(buf)


def model_card(plan: MergePlan, recipe_text: str, out: Path) -> str:
    """A Hugging Face README.md for the merged model that quotes the recipe."""
    from modelfuse import __version__

    method = plan.tasks[0].method if plan.tasks else None
    others = [m for m in plan.models if m != plan.base]
    lines = ["---"]
    if plan.base:
        lines.append(f"base_model: {plan.base}")
    lines += ["library_name: transformers", "tags:", "- modelfuse", "- merge", "---", ""]
    lines.append(f"# {plan.recipe.name or out.name}")
    lines.append("")
    paper = f" ({method.paper})" if method is not None and method.paper else ""
    lines.append(
        f"This model was merged with [modelfuse](https://pypi.org/project/modelfuse/) {__version__} "
        f"using the `{plan.recipe.merge_method}` method{paper}."
    )
    if method is not None and method.mergekit:
        lines += ["", f"mergekit parity of `{method.name}`: {method.mergekit}."]
    lines += ["", "## Models", ""]
    if plan.base:
        lines.append(f"* base: {plan.base}")
    lines += [f"* {m}" for m in others]
    lines += ["", "## Recipe", "", "```yaml", recipe_text.rstrip(), "```", ""]
    return "\n".join(lines)


def write_merge(
    plan: MergePlan,
    out: str | os.PathLike,
    *,
    recipe_text: str,
    force: bool = False,
    seed: int = 0,
    device: str | torch.device = "cpu",
    out_shard_size: int | str = DEFAULT_SHARD_SIZE,
    progress: bool | None = None,
    torch_threads: int | str | None = None,
    freeze_gc: bool = False,
    drop_cache: bool = False,
) -> Path:
    """Run ``plan`` into a Hugging Face folder at ``out``: shards + index, config, tokenizer, model card.

    ``torch_threads`` and ``freeze_gc``: see ``run_tasks``; ``drop_cache``: see ``CheckpointWriter``."""
    from modelfuse import __version__

    target = Path(out)
    metadata = {"format": "pt", "modelfuse_version": __version__, "merge_method": plan.recipe.merge_method}
    with CheckpointWriter(
        target,
        max_shard_size=out_shard_size,
        metadata=metadata,
        force=force,
        protect=plan.input_paths(),
        drop_cache=drop_cache,
    ) as writer:
        writer.declare({t.out: (t.shape, t.out_dtype) for t in plan.tasks})
        run_tasks(
            plan,
            writer.add,
            seed=seed,
            device=device,
            progress=progress,
            reuse_results=True,
            torch_threads=torch_threads,
            freeze_gc=freeze_gc,
        )
        if plan.config is not None:
            writer.write_json("config.json", plan.config)
        if plan.config_from is not None:
            writer.copy_files(plan.models[plan.config_from], CONFIG_FILES)
        if plan.tokenizer_from is not None:
            writer.copy_files(plan.models[plan.tokenizer_from], TOKENIZER_FILES)
        writer.write_text("README.md", model_card(plan, recipe_text, target))
    return writer.target
