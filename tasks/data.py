"""Preference pairs: load any supported schema, apply the recipe's filter, split, and format for TRL.

Every step reads and writes JSON Lines under the run's `data/` folder and returns a small typed
result, so Prefect can cache it and a later stage (or a re-run) reads the file, not memory.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
from prefect import task
from pydantic import BaseModel

from tasks.base import PreftuneError, Workspace, file_sha256, fingerprint, redact, retry_unless_user_error
from tasks.caching import STAGE_CACHE, stage_folder
from tasks.models import ResolvedModel
from tasks.schemas import INSTRUCTION_COLUMNS, normalize
from tasks.settings.data import DataSettings

LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class DataFile(BaseModel):
    """A stage's output file with what downstream caching needs to know about it."""

    path: str
    rows: int
    sha256: str


class LoadedData(DataFile):
    source: str  # what was read, redacted: a task's result may be persisted (pickled), and no credential is kept
    format: str


class FilterReport(DataFile):
    rows_in: int
    dropped: dict[str, int]  # rule -> rows it removed, applied in order


class SplitData(BaseModel):
    train: DataFile
    eval: DataFile
    judge: DataFile | None = None  # train split of the judges trained on this data (disjoint questions)
    overlong: dict[str, int] = {}  # split -> pairs longer than max_length (truncated or dropped, per settings)
    truncated_answers: dict[str, int] = {}  # split -> overlong pairs whose answers alone did not fit (ends cut)
    shared_questions: int = 0  # questions found in more than one split: 0, or the split is refused

    def for_judges(self) -> SplitData:
        """The judges' view: their own train split, the same held-out questions."""
        return SplitData(train=self.judge, eval=self.eval)


# --- loading ---------------------------------------------------------------------------------


def read_json_lines(path: Path) -> pd.DataFrame:
    """JSON Lines read as written: a bad line is named by its number, and values keep their JSON
    types so a score written as text is reported rather than silently cast."""
    records = []
    try:
        with open(path, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                try:
                    line = raw.decode("utf-8")
                    if not line.strip():
                        continue
                    record = json.loads(line)
                except UnicodeDecodeError:
                    raise PreftuneError(f"{path}: line {number} is not UTF-8 text") from None
                except json.JSONDecodeError as error:
                    raise PreftuneError(f"{path}: line {number} is not valid JSON ({error.msg})") from None
                if not isinstance(record, dict):
                    raise PreftuneError(
                        f"{path}: line {number} is a JSON {type(record).__name__}, expected an object of columns"
                    )
                records.append(record)
    except OSError as error:
        raise PreftuneError(f"{path}: cannot read the file ({error.strerror})") from None
    return pd.DataFrame.from_records(records)


def read_table(source: str, split: str = "train", data_dir: str | None = None) -> pd.DataFrame:
    """A local file by suffix, else a hub dataset id (needs network access to the hub)."""
    from datasets import load_dataset
    from datasets.exceptions import DatasetNotFoundError

    path = Path(source).expanduser()
    if path.suffix in LOCAL_SUFFIXES:
        if not path.is_file():
            raise PreftuneError(f"data file not found: {path}")
        if path.suffix == ".jsonl":
            return read_json_lines(path)
        try:
            dataset = load_dataset(LOCAL_SUFFIXES[path.suffix], data_files=str(path), split="train")
        except Exception as error:  # a corrupt parquet, a csv with ragged rows, a json that is not a table
            reason = str(error.__cause__ or error).splitlines()[0][:300]
            raise PreftuneError(f"{path}: cannot read it as {path.suffix[1:]} ({reason})") from None
    else:
        try:
            dataset = load_dataset(source, split=split, data_dir=data_dir)
        except DatasetNotFoundError as error:  # unknown or gated id: retrying cannot help; network errors are retried
            raise PreftuneError(f"dataset {source!r} not found on the Hugging Face Hub ({error})") from None
    return dataset.to_pandas()


def write_jsonl(frame: pd.DataFrame, path: Path) -> DataFile:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_json(path, orient="records", lines=True, force_ascii=False)
    return DataFile(path=str(path), rows=len(frame), sha256=file_sha256(path))


def read_jsonl(path: str | Path) -> pd.DataFrame:
    return pd.read_json(path, lines=True, dtype=False)


def load(settings: DataSettings, data_dir: Path) -> LoadedData:
    from tasks.synthetic import GENERATORS

    source = settings.source
    if source in GENERATORS:
        raw = data_dir / "synthetic.jsonl"
        write_jsonl(pd.DataFrame(GENERATORS[source](settings.synthetic_rows, settings.seed)), raw)
        source = str(raw)
    table = read_table(source, settings.split, settings.data_dir)
    if settings.max_rows:
        table = table.head(settings.max_rows)
    if table.empty:
        raise PreftuneError(f"{source}: no rows")
    frame = normalize(table, settings.format, source)
    fmt = frame.pop("_format").iloc[0]
    written = write_jsonl(frame, data_dir / "normalized.jsonl")
    return LoadedData(**written.model_dump(), source=redact(source), format=fmt)


# --- filtering, splitting, formatting ----------------------------------------------------------


def filter_rules(settings: DataSettings) -> list[tuple[str, callable]]:
    """(name, keep-mask) in the order applied; a rule whose column the data lacks keeps every row."""

    def has(frame, column):
        return frame[column].notna()

    rules = [
        ("empty_response", lambda f: (f.chosen.str.strip() != "") & (f.rejected.str.strip() != "")),
        ("chosen_equals_rejected", lambda f: f.chosen.str.strip() != f.rejected.str.strip()),
        (
            "duplicate_pair",
            lambda f: ~f.apply(lambda r: fingerprint([r.system, r.prompt, r.chosen, r.rejected]), axis=1).duplicated(),
        ),
        ("prompt_mismatch", lambda f: ~f.prompt_mismatch.astype(bool)),
    ]
    if settings.status_rule == "drop_ties":
        rules.append(("status_tie", lambda f: ~has(f, "status") | (f.status != "tie")))
    elif settings.status_rule == "only_ties":
        rules.append(("status_not_tie", lambda f: ~has(f, "status") | (f.status == "tie")))
    if settings.min_chosen_score is not None:
        threshold = settings.min_chosen_score
        rules.append(
            ("chosen_score_below_min", lambda f: ~has(f, "chosen_score") | (f.chosen_score.astype(float) >= threshold))
        )
    if settings.drop_in_gsm8k_train:
        rules.append(("in_gsm8k_train", lambda f: ~has(f, "in_gsm8k_train") | ~f.in_gsm8k_train.astype(bool)))
    return rules


def apply_filter(loaded: DataFile, settings: DataSettings, data_dir: Path) -> FilterReport:
    frame = read_jsonl(loaded.path)
    dropped: dict[str, int] = {}
    for name, keep in filter_rules(settings):
        mask = keep(frame).fillna(True).astype(bool)
        dropped[name] = int((~mask).sum())
        frame = frame[mask]
    if frame.empty:
        removed = ", ".join(f"{rule}: {count}" for rule, count in dropped.items() if count)
        raise PreftuneError(f"no rows left after filtering {loaded.rows} rows ({removed})")
    written = write_jsonl(frame, data_dir / "filtered.jsonl")
    return FilterReport(**written.model_dump(), rows_in=loaded.rows, dropped=dropped)


def normalize_question(text: str) -> str:
    """Case, spacing and closing punctuation do not make another question."""
    return re.sub(r"\s+", " ", text).strip().lower().rstrip("?.!: ")


def question_keys(prompt: list[dict]) -> set[str]:
    """The first and the last user turn: what a split must keep apart."""
    users = [normalize_question(message["content"]) for message in prompt if message["role"] == "user"]
    return {users[0], users[-1]} if users else {""}


def question_groups(frame: pd.DataFrame) -> list[int]:
    """Rows that share a first or a last user turn belong together (connected through shared questions),
    so no question lands in two splits, whatever the system prompt or the rest of the conversation."""
    parent = list(range(len(frame)))

    def root(index: int) -> int:
        while parent[index] != index:
            parent[index] = parent[parent[index]]
            index = parent[index]
        return index

    first_row_of: dict[str, int] = {}
    for row, prompt in enumerate(frame.prompt):
        for key in question_keys(prompt):
            if key in first_row_of:
                parent[root(row)] = root(first_row_of[key])
            else:
                first_row_of[key] = row
    return [root(row) for row in range(len(frame))]


def shared_questions(*parts: pd.DataFrame) -> int:
    """Questions found in more than one of the parts (must be 0)."""
    seen = [set().union(*map(question_keys, part.prompt)) if len(part) else set() for part in parts]
    return len(set().union(*(a & b for i, a in enumerate(seen) for b in seen[i + 1 :])))


def split(filtered: DataFile, settings: DataSettings, data_dir: Path) -> SplitData:
    """Seeded split by question: held-out, then (optionally) the judges' share, then the policy's train
    split. Whole question groups move together, so the fractions are met to within one group."""
    frame = read_jsonl(filtered.path).reset_index(drop=True)
    groups = pd.Series(question_groups(frame))
    order = pd.Series(groups.unique()).sample(frac=1.0, random_state=settings.seed).tolist()
    sizes = groups.value_counts()
    bounds = [settings.eval_fraction * len(frame), (settings.eval_fraction + settings.judge_fraction) * len(frame)]
    assignment, taken = {}, 0
    for group in order:
        assignment[group] = "eval" if taken < bounds[0] else "judge" if taken < bounds[1] else "train"
        taken += sizes[group]
    parts = {name: frame[groups.map(assignment) == name] for name in ("train", "eval", "judge")}
    wanted = ["train", "eval"] + (["judge"] if settings.judge_fraction else [])
    empty = [name for name in wanted if parts[name].empty]
    if empty:
        raise PreftuneError(
            f"only {len(order)} distinct questions after filtering: too few to fill the "
            f"{', '.join(empty)} split (eval_fraction {settings.eval_fraction}, "
            f"judge_fraction {settings.judge_fraction})"
        )
    shared = shared_questions(*(parts[name] for name in wanted))
    if shared:  # cannot happen by construction; checked on every run all the same
        raise RuntimeError(f"{shared} questions are in more than one split")
    return SplitData(
        train=write_jsonl(parts["train"], data_dir / "train.jsonl"),
        eval=write_jsonl(parts["eval"], data_dir / "eval.jsonl"),
        judge=write_jsonl(parts["judge"], data_dir / "judge.jsonl") if settings.judge_fraction else None,
        shared_questions=shared,
    )


def to_conversational(frame: pd.DataFrame) -> pd.DataFrame:
    """TRL's conversational preference format; TRL applies the chat template when it tokenizes."""

    def prompt(row):
        system = [{"role": "system", "content": row["system"]}] if row["system"] else []
        return system + list(row["prompt"])

    return pd.DataFrame(
        {
            "prompt": frame.apply(prompt, axis=1),
            "chosen": frame.chosen.map(lambda text: [{"role": "assistant", "content": text}]),
            "rejected": frame.rejected.map(lambda text: [{"role": "assistant", "content": text}]),
        }
        | {name: frame[name] for name in INSTRUCTION_COLUMNS if name in frame}
    )


def _length(tokenizer, prompt: list[dict], answer: str) -> int:
    messages = list(prompt) + [{"role": "assistant", "content": answer}]
    return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))


def _cut_head(tokenizer, text: str, tokens: int) -> str:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids[tokens:]) if tokens < len(ids) else ""


def _cut_tail(tokenizer, text: str, keep: int) -> str:
    return tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"][: max(keep, 1)])


def fit_pair(
    prompt: list[dict], chosen: str, rejected: str, tokenizer, max_length: int
) -> tuple[list[dict], str, str, bool]:
    """Shorten a pair to max_length tokens as the trainers will render it: the prompt loses its oldest
    turns, then the start of its oldest text (the question's end, nearest the answer, stays); the answers
    are cut at their ends only if they alone do not fit. Returns the pair and whether an answer was cut."""
    prompt = [dict(message) for message in prompt]

    def excess() -> int:
        return max(_length(tokenizer, prompt, answer) for answer in (chosen, rejected)) - max_length

    while excess() > 0 and sum(m["role"] == "user" for m in prompt) > 1:
        first_user = next(i for i, m in enumerate(prompt) if m["role"] == "user")
        del prompt[first_user : first_user + 2]  # the oldest exchange: a user turn and its reply
    for _ in range(4):  # decode/encode can shift a token or two: re-measure
        over = excess()
        if over <= 0:
            return prompt, chosen, rejected, False
        oldest = prompt[0]
        if (
            oldest["role"] == "system"
            or len(tokenizer(oldest["content"], add_special_tokens=False)["input_ids"]) > over + 8
        ):
            oldest["content"] = _cut_head(tokenizer, oldest["content"], over + 2)
            if oldest["role"] == "system" and not oldest["content"].strip():
                prompt.pop(0)
        else:
            break
    # The answers alone are too long: keep the question's last 32 tokens and the answers' beginnings.
    prompt[-1]["content"] = tokenizer.decode(
        tokenizer(prompt[-1]["content"], add_special_tokens=False)["input_ids"][-32:]
    )
    prompt[:] = [m for m in prompt if m["role"] != "system"][-1:]
    room = max_length - _length(tokenizer, prompt, "")
    for _ in range(4):
        chosen, rejected = (_cut_tail(tokenizer, answer, room) for answer in (chosen, rejected))
        if excess() <= 0:
            break
        room -= excess() + 1
    return prompt, chosen, rejected, True


def format_split(
    splits: SplitData, tokenizer, data_dir: Path, max_length: int | None = None, overlong: str = "truncate"
) -> SplitData:
    """Write conversational files for each split; count pairs longer than max_length, then shorten them
    (`fit_pair`) or drop them, so no trainer drops or cuts anything on its own."""
    out: dict = {}
    counts, answers_cut = {}, {}
    for name in ("train", "eval", "judge"):
        part = getattr(splits, name)
        if part is None:
            continue
        frame = to_conversational(read_jsonl(part.path))
        try:
            lengths = frame.apply(
                lambda row: max(
                    _length(tokenizer, row.prompt, answer[0]["content"]) for answer in (row.chosen, row.rejected)
                ),
                axis=1,
            )
        except Exception as error:  # template errors come from jinja, deep inside transformers
            raise PreftuneError(f"the chat template cannot render the {name} split: {error}") from None
        too_long = lengths > max_length if max_length else pd.Series(False, index=frame.index)
        counts[name], answers_cut[name] = int(too_long.sum()), 0
        if overlong == "drop":
            frame = frame[~too_long]
            if frame.empty:
                raise PreftuneError(f"every {name} pair is longer than max_length={max_length} tokens")
        else:
            for index in frame.index[too_long]:
                row = frame.loc[index]
                prompt, chosen, rejected, cut = fit_pair(
                    row.prompt, row.chosen[0]["content"], row.rejected[0]["content"], tokenizer, max_length
                )
                frame.at[index, "prompt"] = prompt
                frame.at[index, "chosen"] = [{"role": "assistant", "content": chosen}]
                frame.at[index, "rejected"] = [{"role": "assistant", "content": rejected}]
                answers_cut[name] += cut
        out[name] = write_jsonl(frame, data_dir / f"{name}.conversational.jsonl")
    return SplitData(**out, overlong=counts, truncated_answers=answers_cut, shared_questions=splits.shared_questions)


def render_example(path: str, tokenizer) -> str:
    """The first pair as the model sees it: for the run's lineage and the README's reader."""
    row = read_jsonl(path).iloc[0]
    prompt = tokenizer.apply_chat_template(list(row.prompt), tokenize=False, add_generation_prompt=True)
    return f"{prompt}[chosen] {row.chosen[0]['content']}\n[rejected] {row.rejected[0]['content']}\n"


# --- Prefect tasks --------------------------------------------------------------------------

RETRY = dict(retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_unless_user_error)
DATA_TASK = dict(RETRY, cache_policy=STAGE_CACHE, persist_result=True)


@task(name="load-preferences", task_run_name="load-{stage}", **RETRY)
def load_preferences(settings: DataSettings, workspace: Workspace, stage: str = "data") -> LoadedData:
    # Not cached: the source may change under the same name; its hash keys the stages after it.
    return load(settings, workspace.stage(stage, settings))


@task(name="filter-preferences", task_run_name="filter-{stage}", **DATA_TASK)
def filter_preferences(
    loaded: LoadedData, settings: DataSettings, workspace: Workspace, stage: str = "data"
) -> FilterReport:
    return apply_filter(loaded, settings, stage_folder(workspace, stage))


@task(name="split-preferences", task_run_name="split-{stage}", **DATA_TASK)
def split_preferences(
    filtered: FilterReport, settings: DataSettings, workspace: Workspace, stage: str = "data"
) -> SplitData:
    return split(filtered, settings, stage_folder(workspace, stage))


@task(name="format-preferences", task_run_name="format-{stage}", **DATA_TASK)
def format_preferences(
    splits: SplitData,
    model: ResolvedModel,
    max_length: int,
    settings: DataSettings,
    workspace: Workspace,
    stage: str = "data",
) -> SplitData:
    return format_split(splits, model.tokenizer(), stage_folder(workspace, stage), max_length, settings.overlong)
