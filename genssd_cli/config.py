"""Configuration: the pydantic models of every config file (run, train, pipeline, eval) and their
YAML loading with `--set key=value` overrides."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from genssd_cli.errors import UsageError
from genssd_cli.methods import METHODS
from genssd_cli.paths import bundled_dir
from genssd_cli.redact import is_env_name, redact


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LaunchConfig(_Strict):
    """genssd starts a local llama.cpp OpenAI-compatible server for the run and stops it after."""

    gguf: str = Field(description="a shipped model name (gemma-3-270m) or a path to a .gguf file")
    port: int = Field(0, ge=0, le=65535, description="0 picks a free port")
    n_ctx: int = Field(4096, ge=256)
    startup_timeout_s: float = Field(180.0, gt=0)
    extra_args: list[str] = Field(default_factory=list)

    @field_validator("extra_args")
    @classmethod
    def _not_ours(cls, args: list[str]) -> list[str]:
        """genssd sets where the server listens and its key; a key here would also show in `ps`.
        The server's argparse takes any unique prefix of a flag, so prefixes count too."""
        for arg in args:
            flag = arg.split("=", 1)[0].lstrip("-").replace("-", "_").lower()
            if not arg.startswith("--") or not flag:
                continue
            if "api_key".startswith(flag) and len(flag) >= 2:
                raise ValueError(
                    "API keys are never read from config files: genssd gives the server it launches a key of "
                    "its own (drop --api_key)"
                )
            taken = next((name for name in ("host", "port", "config_file") if name.startswith(flag)), None)
            if taken:
                raise ValueError(f"--{taken} is genssd's to set (it listens on 127.0.0.1 at teacher.launch.port)")
        return args


def _env_name(name: str | None) -> str | None:
    """`api_key_env` names a variable; a key typed there by mistake is refused without being shown."""
    if name is not None and not is_env_name(name):
        raise ValueError(
            "not the name of an environment variable (letters, digits and _): put the key itself in a "
            "variable and give that variable's name (the value is not shown here)"
        )
    return name


class PriceSettings(_Strict):
    """What the endpoint charges, in your currency per million tokens."""

    input: float = Field(ge=0, description="per million prompt tokens")
    output: float = Field(ge=0, description="per million completion tokens")

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input + completion_tokens * self.output) / 1e6


class EndpointConfig(_Strict):
    """One server of a teacher pool; unset limits and prices are the teacher section's."""

    base_url: str = Field(min_length=1)
    name: str | None = Field(None, description="how summary.json and doctor call it; null: host:port")
    weight: float = Field(1.0, gt=0, description="share of the load relative to the others")
    api_key_env: str | None = None
    max_concurrency: int | None = Field(None, ge=1)
    requests_per_minute: float | None = Field(None, gt=0)
    tokens_per_minute: float | None = Field(None, gt=0)
    price: PriceSettings | None = None

    _key_env = field_validator("api_key_env")(_env_name)

    @property
    def label(self) -> str:
        return self.name or endpoint_label(self.base_url)


def endpoint_label(base_url: str) -> str:
    """host:port, credentials in the URL redacted (`***@host:port`): a label is written and shown."""
    parsed = urlparse(redact(base_url))
    return parsed.netloc or redact(base_url)


# The request fields genssd sets itself (or the OpenAI client does): teacher.extra_body may not hold them.
GENSSD_REQUEST_FIELDS = frozenset({
    "model", "prompt", "messages", "n", "max_tokens", "max_completion_tokens", "seed", "temperature", "top_p",
    "stop", "logprobs", "top_logprobs", "stream", "stream_options", "echo", "continue_final_message",
    "add_generation_prompt",
})  # fmt: skip


class TeacherConfig(_Strict):
    model: str = Field(min_length=1, description="the model name the endpoint serves")
    base_url: str | None = None
    endpoints: list[EndpointConfig] = Field(default_factory=list, description="several servers of one model")
    api_key_env: str | None = Field(None, description="name of the env var holding the API key")
    launch: LaunchConfig | None = None
    # completions: raw /v1/completions of the prompt template + the trace (the template carries
    # the teacher's chat format). chat-continue: /v1/chat/completions, the problem as the user
    # message and the trace as a partial assistant message the server continues.
    mode: Literal["completions", "chat-continue"] = "completions"
    prefill: Literal["continue_final_message", "prefix"] = Field(
        "continue_final_message",
        description="chat-continue: vLLM/SGLang's continue_final_message, or the assistant message's prefix: true",
    )
    system: str | None = Field(None, description="a system message (chat-continue, or with a chat template)")
    assistant_prefix: str = Field("", description="what the assistant turn opens with, e.g. <think>")
    temperature: float = Field(0.8, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: list[str] = Field(default_factory=list)
    seed: int = 0
    max_concurrency: int = Field(4, ge=1, description="requests in flight per endpoint")
    routing: Literal["affinity", "least-loaded"] = Field(
        "affinity",
        description="ours, not the paper's: how a pool's endpoint is picked. affinity: each trajectory's "
        "requests go to one endpoint (rendezvous hashing of its problem id and sample, spilling only when that one "
        "is full and over 1.25x its share of the load), so its server's prefix cache holds the growing trace; "
        "least-loaded: every request to the least-loaded endpoint (docs/teachers.md#several-servers-endpoint-pools)",
    )
    requests_per_minute: float | None = Field(None, gt=0, description="per endpoint; null: no limit")
    tokens_per_minute: float | None = Field(None, gt=0, description="per endpoint (prompt + max new); null: none")
    timeout_s: float = Field(120.0, gt=0)
    request_deadline_s: float | None = Field(
        None, gt=0, description="the longest one request may take in all, a server trickling its bytes included "
        "(then retried as a `deadline` fault); null: twice timeout_s",
    )
    max_reply_bytes: int = Field(
        32 * 2**20, ge=2**16, description="the largest reply read (then retried as a `too_large` fault); the "
        "default holds 16 choices of 8192 tokens with their logprobs",
    )
    retries: int = Field(5, ge=0)
    preflight: bool = Field(True, description="genssd run first checks that chat-continue really continues")
    logprobs: bool = Field(
        True, description="ask for each choice's tokens (logprobs) when n > 1, to count each candidate's exactly"
    )
    price: PriceSettings | None = Field(None, description="null: cost not counted")
    cache: str | None = Field(
        None, description="a sqlite file of teacher responses shared by runs: a request sent before is answered "
        "from it and not paid again (docs/teachers.md#the-response-cache); null: none",
    )
    extra_body: dict[str, Any] = Field(
        default_factory=dict,
        description="more fields sent with every request (completions and chat), e.g. the server's sampler: "
        "repeat_penalty, top_k, min_p, chat_template_kwargs, a provider's routing; part of the results hash and of "
        "the response cache's identity; the fields genssd sets itself are refused",
    )

    _key_env = field_validator("api_key_env")(_env_name)

    @model_validator(mode="before")
    @classmethod
    def _no_key_in_files(cls, data: Any) -> Any:
        if isinstance(data, dict) and "api_key" in data:
            raise ValueError(
                "API keys are never read from config files: put it in an environment variable "
                "and set teacher.api_key_env to that variable's name"
            )
        return data

    @field_validator("extra_body")
    @classmethod
    def _extra_body_adds_only(cls, body: dict[str, Any]) -> dict[str, Any]:
        # A field genssd sets itself would silently replace (or be replaced by) genssd's own value.
        clash = sorted(set(body) & GENSSD_REQUEST_FIELDS)
        if clash:
            raise ValueError(f"{', '.join(clash)} genssd sets itself (teacher.model, .temperature, .top_p, .stop, "
                             ".seed, search.*): not in extra_body")  # fmt: skip
        try:
            json.dumps(body, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"must hold JSON values only ({exc})") from None
        return body

    @model_validator(mode="after")
    def _one_endpoint(self) -> TeacherConfig:
        if sum((self.base_url is not None, self.launch is not None, bool(self.endpoints))) != 1:
            raise ValueError("set exactly one of teacher.base_url, teacher.endpoints and teacher.launch")
        labels = [e.label for e in self.endpoints]
        if len(set(labels)) < len(labels):
            raise ValueError("teacher.endpoints: give each endpoint its own name (or base_url)")
        return self

    def price_of(self, endpoint: str | None) -> PriceSettings | None:
        """An endpoint's own price, else the teacher's."""
        own = next((e.price for e in self.endpoints if e.label == endpoint), None)
        return own or self.price

    @property
    def priced(self) -> bool:
        return all(e.price or self.price for e in self.endpoints) if self.endpoints else self.price is not None


class StudentConfig(_Strict):
    model: str = Field(min_length=1, description="shipped name, HF model id, or local folder")
    gguf_file: str | None = None
    adapter: str | None = None
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    batch_tokens: int | None = Field(
        None, ge=64, description="padded tokens per scoring forward; null: 8192 on a GPU, 512 on CPU"
    )
    cache_mb: int = Field(2048, ge=0, description="prefix KV caches budget (MiB); 0: recompute every step")


class SearchConfig(_Strict):
    n: int = Field(4, ge=1, description="candidate chunks per step")
    chunk_tokens: int = Field(64, ge=1)
    max_steps: int = Field(16, ge=1)
    max_new_tokens: int = Field(1024, ge=1)
    prune_ppl: float | None = Field(None, gt=0, description="null: never prune")
    retries: int = Field(1, ge=0, description="re-samples of a step before pruning")
    samples: int = Field(1, ge=1, description="trajectories per problem")


class MorsdSettings(_Strict):
    """`method: morsd` (the paper's second baseline; how redundancy is measured and how many are
    kept are our choices, see methods.py)."""

    keep: int = Field(1, ge=1, description="rationales kept per request (each a training row), lowest RD first")
    duplicate_threshold: float = Field(
        0.8, gt=0, le=1, description="word n-gram Jaccard overlap at which a rationale repeats a kept one"
    )
    duplicate_ngram: int = Field(3, ge=1, description="n of those word n-grams")
    fraction: float | None = Field(
        None, gt=0, le=1, description="ours: dataset-level selection, after every problem ended: keep the "
        "lowest-RD fraction of the rows the per-request step kept, across the dataset; null: every one",
    )
    rows: int | None = Field(
        None, ge=1, description="ours: dataset-level selection: keep the N lowest-RD of those rows; null: no budget"
    )


class DataConfig(_Strict):
    source: str = Field(min_length=1, description="arith | gsm8k-test | path to a JSONL file")
    count: int = Field(64, ge=1, description="arith: problems to generate")
    seed: int = Field(0, description="arith: generator seed")
    steps: Literal[1, 2, 3] | None = Field(
        None, description="arith: operations per problem (difficulty); null: the mixed two- and three-step set"
    )
    question_field: str = "question"
    answer_field: str = "answer"
    id_field: str = "id"
    limit: int | None = Field(None, ge=1)
    too_long: Literal["refuse", "skip"] = Field(
        "refuse", description="a problem the student cannot hold with search.max_new_tokens: refuse the run, or skip "
        "it (listed in failures.jsonl as too_long)",
    )


class PromptsConfig(_Strict):
    teacher: str = "teacher_fewshot"
    student: str = "student"
    teacher_chat_template: str | None = Field(
        None, description="completions mode: wrap the teacher prompt in this tokenizer's chat template (id or folder)"
    )


class EngineConfig(_Strict):
    max_active_problems: int = Field(8, ge=1)
    progress_interval_s: float = Field(10.0, gt=0)
    # Every record is flushed to the OS at once (a killed process loses nothing); fsync decides
    # what survives a machine crash: "record" syncs each one, "interval" at most every N ms.
    fsync: Literal["record", "interval", "never"] = "interval"
    fsync_interval_ms: int = Field(1000, ge=1)


class RunConfig(_Strict):
    method: Literal[tuple(METHODS)] = "genssd"  # type: ignore[valid-type]
    teacher: TeacherConfig
    student: StudentConfig
    search: SearchConfig = Field(default_factory=SearchConfig)
    data: DataConfig
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    morsd: MorsdSettings = Field(default_factory=MorsdSettings)
    max_cost: float | None = Field(None, gt=0, description="stop (resumable) once the teacher cost reaches it")

    @model_validator(mode="after")
    def _cost_needs_prices(self) -> RunConfig:
        if self.max_cost is not None and not self.teacher.priced:
            raise ValueError("max_cost needs teacher.price (input and output per million tokens) for every endpoint")
        return self


def default_config_path() -> Path:
    return bundled_dir("configs") / "demo.yaml"


def load_run_config(path: Path | None, overrides: list[str] = ()) -> RunConfig:
    return _load(RunConfig, path or default_config_path(), overrides)


def _load(model: type[BaseModel], path: Path, overrides: list[str]) -> Any:
    """YAML file, then `--set` overrides, then validation: one `error:` line for any mistake."""
    raw = _read_yaml(path)
    for item in overrides:
        _apply_override(raw, item)
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise UsageError(f"config {path}: {format_validation_error(exc)}") from None


def format_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise UsageError(f"config path is a folder, not a YAML file: {path}") from None
    except UnicodeDecodeError:
        raise UsageError(f"config file is not UTF-8 text: {path}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise UsageError(f"config {path} is not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise UsageError(f"config {path} must be a mapping of settings, got {type(data).__name__}")
    return data


def _apply_override(raw: dict[str, Any], item: str) -> None:
    """`--set search.n=8`: the value is parsed as YAML, so numbers, null and lists work."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise UsageError(f"--set expects KEY=VALUE (e.g. search.n=8), got {item!r}")
    *parents, leaf = key.strip().split(".")
    node = raw
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UsageError(f"--set {key}: {part!r} is not a section")
        node = child
    try:
        node[leaf] = yaml.safe_load(value)
    except yaml.YAMLError:
        raise UsageError(f"--set {key}: value {value!r} is not valid YAML") from None


class LoraSettings(_Strict):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"


class TrainingSettings(_Strict):
    epochs: float = Field(3.0, gt=0)
    learning_rate: float = Field(2e-4, gt=0)
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    warmup_steps: int = Field(0, ge=0)
    seed: int = 0
    max_length: int = Field(1024, ge=16, description="tokens of prompt + completion; longer rows are cut")
    logging_steps: int = Field(1, ge=1)
    save_steps: int = Field(50, ge=1, description="checkpoint every N steps (a re-run resumes from the last)")
    report_to: list[str] = Field(
        default_factory=list,
        description="trackers for the training curves, as transformers' report_to: tensorboard (files in "
        "OUT/tensorboard), trackio, wandb, mlflow, …; each needs its package; []: none",
    )
    run_name: str | None = Field(None, description="the run's name in the trackers; null: the --out folder's name")


class TrainConfig(_Strict):
    student: StudentConfig | None = Field(None, description="null: the student of the first run directory")
    lora: LoraSettings = Field(default_factory=LoraSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    include_incorrect: bool = False


def load_train_config(path: Path | None, overrides: list[str] = ()) -> TrainConfig:
    return _load(TrainConfig, path or bundled_dir("configs") / "train.yaml", overrides)


class ColdStartSettings(_Strict):
    set: list[str] = Field(default_factory=lambda: ["method=standard-kd"], description="--set overrides of its run")
    limit: int | None = Field(None, ge=1)


class DistillSettings(_Strict):
    include_incorrect: bool = Field(False, description="train on trajectories with a wrong answer too")
    set: list[str] = Field(default_factory=list, description="--set overrides of the train config")


class EvalStageSettings(_Strict):
    dataset: str | list[str] = Field(
        "gsm8k", validation_alias=AliasChoices("dataset", "bench"),  # `bench`: its earlier name
        description="one eval dataset or several, as genssd eval's --dataset",
    )
    limit: int | dict[str, int] | None = Field(
        None, description="only the first N problems: one number, or per dataset (others: all)"
    )
    config: str = Field("eval.yaml", description="eval config, next to the pipeline config or bundled")
    set: list[str] = Field(default_factory=list, description="--set overrides of the eval config")
    samples: int | dict[str, int] = Field(
        1, description="generations per problem (genssd eval's --samples): one number, or per dataset (others: 1)"
    )

    @field_validator("dataset")
    @classmethod
    def _some_datasets(cls, dataset: str | list[str]) -> str | list[str]:
        if isinstance(dataset, list) and (not dataset or len(set(dataset)) < len(dataset)):
            raise ValueError("give at least one eval dataset, each once")
        return dataset

    @model_validator(mode="after")
    def _per_dataset_settings_of_known_datasets(self) -> EvalStageSettings:
        for key, value in (("samples", self.samples), ("limit", self.limit)):
            per_dataset = value if isinstance(value, dict) else {}
            unknown = [d for d in per_dataset if d not in self.datasets]
            if unknown:
                raise ValueError(f"{key} names {', '.join(unknown)}, not among the eval datasets")
            if min([value] if isinstance(value, int) else per_dataset.values(), default=1) < 1:
                raise ValueError(f"{key} must be at least 1")
        return self

    @property
    def datasets(self) -> list[str]:
        return [self.dataset] if isinstance(self.dataset, str) else self.dataset

    def samples_of(self, dataset: str) -> int:
        """Generations per problem of one eval dataset."""
        return self.samples if isinstance(self.samples, int) else self.samples.get(dataset, 1)

    def limit_of(self, dataset: str) -> int | None:
        """How many of one eval dataset's problems are evaluated (None: all)."""
        return self.limit.get(dataset) if isinstance(self.limit, dict) else self.limit


class PipelineConfig(_Strict):
    run_config: str = Field("demo.yaml", description="a path relative to this file, or a bundled config")
    train_config: str = "train.yaml"
    out: str | None = Field(None, description="null: runs/PIPELINE_CONFIG_NAME")
    cold_start: ColdStartSettings | None = Field(default_factory=ColdStartSettings, description="null: none")
    methods: list[Literal[tuple(METHODS)]] = Field(default_factory=lambda: ["genssd"], min_length=1)  # type: ignore[valid-type]
    set: list[str] = Field(default_factory=list, description="--set overrides of every method's run")
    limit: int | None = Field(None, ge=1, description="only the first N problems in each method's run")
    shards: int | None = Field(None, ge=1, description="run each method's problems as N shards (genssd run --shards)")
    executor: Literal["local", "ray"] = Field("local", description="where the shards run")
    ray_address: str | None = Field(None, description="an existing Ray cluster (auto, ray://HOST:PORT); null: local")
    distill: DistillSettings = Field(default_factory=DistillSettings)
    eval: EvalStageSettings | None = Field(
        None, description="null: no eval; else the base student's, the cold start's and each method's"
    )


def load_pipeline_config(path: Path, overrides: list[str] = ()) -> PipelineConfig:
    return _load(PipelineConfig, path, overrides)


class EvalConfig(_Strict):
    prompt: str = Field("student", description="the student's prompt template (the one its training rows used)")
    temperature: float = Field(0.0, ge=0, description="0: greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(256, ge=1)
    batch_size: int = Field(8, ge=1, description="prompts per generate call")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    backend: Literal["auto", "hf", "vllm"] = Field("auto", description="auto: vLLM when installed and on a GPU")
    vllm_args: dict[str, Any] = Field(
        default_factory=dict, description="extra vLLM engine arguments, e.g. gpu_memory_utilization, max_model_len"
    )
    question_field: str = "question"  # for --dataset FILE.jsonl
    answer_field: str = "answer"
    id_field: str = "id"


def load_eval_config(path: Path | None, overrides: list[str] = ()) -> EvalConfig:
    return _load(EvalConfig, path or bundled_dir("configs") / "eval.yaml", overrides)
