"""The Triton Inference Server python-backend model of a ``triton-repo`` repository.

``python -m engines triton-repo`` copies this file verbatim to ``REPO/<name>/1/model.py``. It is a *decoupled*
model: ``execute()`` reads each request's inputs, queues it on the engines :class:`Scheduler` (continuous batching
over the export in ``1/export``, exactly as ``python -m engines serve``) and returns at once; the scheduler thread
sends the responses through the request's response sender: one per text delta when ``stream`` is true (the last one
carries ``finish_reason`` and the final flag), otherwise one response with the whole text and the final flag. A
request that fails gets an error response.

``triton_python_backend_utils`` exists only inside Triton's python stub, so it is imported in the methods of
:class:`TritonPythonModel`, never at import time; the translation (inputs -> prompt and settings, scheduler events
-> replies) is plain functions that the unit tests drive with fakes. The stub does not see ``PYTHONPATH``: the
config parameter ``project_root`` (the folder holding the ``engines`` package) is put on ``sys.path`` first.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["INPUT_NAMES", "InputError", "Job", "QueueMetrics", "Replies", "Reply", "ResponseSink", "TritonPythonModel",
           "add_project_root", "model_parameters", "parse_inputs", "read_inputs", "send_reply"]

log = logging.getLogger("gptmeg.triton")

INPUT_NAMES = ("text_input", "max_tokens", "stream", "temperature", "top_p", "top_k", "repetition_penalty",
               "frequency_penalty", "presence_penalty", "seed", "stop_words", "ignore_eos")


class InputError(ValueError):
    """A request's inputs cannot be served; the message goes back in an error response."""


# --- configuration -----------------------------------------------------------------------------------------------


def model_parameters(model_config: dict) -> dict[str, str]:
    """The ``parameters`` of config.pbtxt as {key: string_value}."""
    return {key: str(value.get("string_value", "")) for key, value in (model_config.get("parameters") or {}).items()}


def add_project_root(root: str | None) -> None:
    """Put the folder holding ``engines`` first on ``sys.path`` (when it exists: a pip-installed project needs none)."""
    if root and Path(root).is_dir() and root not in sys.path:
        sys.path.insert(0, root)


# --- inputs -> job ---------------------------------------------------------------------------------------------


def read_inputs(request, pb_utils) -> dict[str, np.ndarray]:
    """Every known input the request carries, as numpy arrays (read inside ``execute()``: the request object is
    not valid in other threads)."""
    values = {}
    for name in INPUT_NAMES:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is not None:
            values[name] = tensor.as_numpy()
    return values


@dataclass(frozen=True)
class Job:
    prompt: list[int]
    settings: object  # engines.serving.scheduler.ChoiceSettings
    stream: bool


def _one(values: dict, name: str):
    """The single element of input ``name`` (None when absent)."""
    if name not in values:
        return None
    array = np.asarray(values[name]).reshape(-1)
    if array.size != 1:
        raise InputError(f"input '{name}' must hold one value, got {array.size}.")
    return array[0]


def _text(value, name: str) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as error:
            raise InputError(f"input '{name}' is not valid UTF-8 (byte {error.start}).") from None
    return str(value)


def _number(values: dict, name: str, kind):
    value = _one(values, name)
    if value is None:
        return None
    number = kind(value)
    if kind is float and not math.isfinite(number):
        raise InputError(f"input '{name}' must be a finite number, got {number}.")
    return number


def parse_inputs(values: dict[str, np.ndarray], tokenizer, spec, default_max_tokens: int = 16) -> Job:
    """The prompt ids and :class:`ChoiceSettings` of one request, or :class:`InputError` saying what is wrong.

    Same meaning as ``POST /v1/completions`` of ``engines serve``: an omitted temperature samples at 1.0, temperature
    0 is greedy; ``max_tokens`` defaults to ``default_max_tokens`` (cut to the context)."""
    from engines.serving.settings import choice_settings

    if "text_input" not in values:
        raise InputError("input 'text_input' is required.")
    text = _text(_one(values, "text_input"), "text_input")
    prompt = tokenizer.encode(text).ids
    if not prompt:
        raise InputError("the prompt is empty: it must have at least one token.")
    for name in ("frequency_penalty", "presence_penalty"):
        penalty = _number(values, name, float)
        if penalty not in (None, 0.0):
            raise InputError(f"{name} is not supported (got {penalty}); use repetition_penalty.")
    stop = tuple(_text(v, "stop_words") for v in np.asarray(values.get("stop_words", [])).reshape(-1))
    if any(not s for s in stop):
        raise InputError("a stop word must not be empty.")
    ignore_eos = _one(values, "ignore_eos")
    try:
        settings = choice_settings(
            len(prompt), spec.max_sequence, max_tokens=_number(values, "max_tokens", int),
            default_max_tokens=default_max_tokens, temperature=_number(values, "temperature", float),
            top_k=_number(values, "top_k", int), top_p=_number(values, "top_p", float),
            repetition_penalty=_number(values, "repetition_penalty", float), seed=_number(values, "seed", int),
            stop=stop, ignore_eos=bool(ignore_eos) if ignore_eos is not None else False)
    except ValueError as error:
        raise InputError(str(error)) from None
    stream = _one(values, "stream")
    return Job(prompt, settings, bool(stream) if stream is not None else False)


# --- scheduler events -> replies -> Triton responses ---------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """One response to send: text (and finish_reason on the last), or an error; ``final`` closes the stream."""

    text: str | None = None
    finish_reason: str | None = None
    error: str | None = None
    final: bool = False


@dataclass
class Replies:
    """Turns the scheduler's events of a one-choice request into replies (stream: one per non-empty delta; otherwise
    the whole text once)."""

    stream: bool
    _text: list[str] = field(default_factory=list)
    done: bool = False

    def __call__(self, event) -> list[Reply]:
        from engines.serving.scheduler import Delta, Failed

        if self.done:
            return []
        if isinstance(event, Failed):
            self.done = True
            return [Reply(error=event.message, final=True)]
        if not isinstance(event, Delta):  # Finished: the final reply went with the last delta
            return []
        if event.finish_reason is not None:
            self.done = True
            text = event.text if self.stream else "".join(self._text) + event.text
            return [Reply(text, event.finish_reason, final=True)]
        if self.stream:
            return [Reply(event.text)] if event.text else []
        self._text.append(event.text)
        return []


def send_reply(sender, reply: Reply, pb_utils) -> None:
    """Send ``reply`` through a Triton response sender."""
    flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if reply.final else 0
    if reply.error is not None:
        response = pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(reply.error))
    else:
        outputs = [pb_utils.Tensor("text_output", np.array([[reply.text.encode("utf-8")]], dtype=np.object_))]
        if reply.finish_reason is not None:
            outputs.append(pb_utils.Tensor("finish_reason",
                                           np.array([[reply.finish_reason.encode()]], dtype=np.object_)))
        response = pb_utils.InferenceResponse(output_tensors=outputs)
    sender.send(response, flags=flags)


class ResponseSink:
    """The ``sink`` of a scheduler request: sends each event's replies. Runs in the scheduler thread, so it never
    raises: a sender that fails (or a request Triton cancelled) cancels the request, which frees its row."""

    def __init__(self, sender, pb_utils, stream: bool):
        self.sender, self.pb_utils = sender, pb_utils
        self.replies = Replies(stream)
        self.request = None  # the scheduler Request, set once built

    def __call__(self, event) -> None:
        if self.replies.done:
            return
        try:
            if getattr(self.sender, "is_cancelled", None) is not None and self.sender.is_cancelled():
                self.replies.done = True
                self._cancel()
                self.sender.send(flags=self.pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                return
            for reply in self.replies(event):
                send_reply(self.sender, reply, self.pb_utils)
        except Exception as error:  # noqa: BLE001 - the scheduler thread must go on serving the other rows
            self.replies.done = True
            self._cancel()
            log.warning("gptmeg: could not send a response (%s); the request is cancelled.", error)

    def _cancel(self) -> None:
        if self.request is not None:
            self.request.cancel()


# --- queue metrics ---------------------------------------------------------------------------------------------------


class QueueMetrics:
    """``gptmeg:num_requests_waiting`` and ``gptmeg:num_requests_running`` on Triton's ``/metrics`` (python-backend
    custom metrics), refreshed from the scheduler's counters by a daemon thread: the queue to autoscale on. Triton's
    own pending-request count stays near 0 for a decoupled model, whose ``execute()`` returns at once."""

    def __init__(self, pb_utils, scheduler, labels: dict[str, str], interval: float = 1.0):
        import threading

        kind = pb_utils.MetricFamily.GAUGE
        self._families = [pb_utils.MetricFamily(name=f"gptmeg:{name}", description=text, kind=kind)
                          for name, text in (("num_requests_waiting", "Choices waiting to join the batch."),
                                             ("num_requests_running", "Rows in the running batch."))]
        self._gauges = [family.Metric(labels=labels) for family in self._families]
        self._scheduler, self._interval = scheduler, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gptmeg-metrics", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            stats = self._scheduler.stats
            self._gauges[0].set(stats.waiting)
            self._gauges[1].set(stats.running)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self._interval + 1)


# --- the model ------------------------------------------------------------------------------------------------------


def build_runtime(artifact, parameters: dict[str, str]):
    """The runtime the parameters ask for: onnxruntime (provider, threads) or tensorrt (the engine in engine_dir)."""
    from engines import make_runtime

    backend = parameters.get("backend", "onnxruntime")
    if backend == "tensorrt":
        from engines.errors import EngineError
        from engines.tensorrt.build import BuildResult
        from engines.tensorrt.cache import EngineMetadata, check_compatible
        from engines.tensorrt.environment import current_gpu, load_tensorrt

        engine_dir = parameters.get("engine_dir")
        if not engine_dir:
            raise EngineError("the config has no engine_dir parameter; rewrite the repository with "
                              "`python -m engines triton-repo EXPORT --backend tensorrt`.")
        folder = artifact.folder / engine_dir
        metadata = EngineMetadata.load(folder)
        check_compatible(metadata, current_gpu(load_tensorrt()),
                         artifact.manifest["files"][artifact.model_path.name]["sha256"])
        return make_runtime(artifact, "tensorrt", engine=BuildResult(folder, metadata, True, 0.0))
    threads = parameters.get("threads")
    return make_runtime(artifact, backend, provider=parameters.get("provider", "cpu"),
                        threads=int(threads) if threads else None)


def version_folder(args: dict) -> Path:
    """This model version's folder (where ``export/`` is)."""
    given = Path(args.get("model_repository", "")) / str(args.get("model_version", "1"))
    return given if given.is_dir() else Path(__file__).resolve().parent


class TritonPythonModel:
    """Triton's python-backend entry points."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        parameters = model_parameters(config)
        add_project_root(parameters.get("project_root"))
        from engines import open_export
        from engines.serving.scheduler import Scheduler

        export = version_folder(args) / parameters.get("export_dir", "export")
        self.artifact = open_export(export, verify=parameters.get("verify", "true") != "false")
        self.tokenizer = self.artifact.tokenizer
        self.spec = self.artifact.spec
        self.default_max_tokens = int(parameters.get("default_max_tokens", 16))
        self.runtime = build_runtime(self.artifact, parameters)
        self.scheduler = Scheduler(self.runtime, self.tokenizer.decode,
                                   max_batch=int(parameters.get("max_batch", 8)),
                                   max_waiting=int(parameters.get("max_waiting", 256)),
                                   max_prefill_tokens=int(parameters.get("max_prefill_tokens", 2048))).start()
        self.metrics = None
        import triton_python_backend_utils as pb_utils

        if hasattr(pb_utils, "MetricFamily"):  # Triton >= 23.05; the metrics are a convenience, never a load error
            try:
                labels = {"model": str(args.get("model_name", config.get("name", ""))),
                          "version": str(args.get("model_version", "1"))}
                self.metrics = QueueMetrics(pb_utils, self.scheduler, labels)
            except Exception as error:  # noqa: BLE001
                log.warning("gptmeg: queue metrics are not available (%s).", error)

    def execute(self, requests) -> None:
        import triton_python_backend_utils as pb_utils

        for request in requests:
            self.submit(request, pb_utils)
        return None

    def submit(self, request, pb_utils) -> None:
        """Queue one Triton request (its inputs are read here, in ``execute()``'s thread)."""
        from engines.errors import EngineError
        from engines.serving.scheduler import Request

        sender = request.get_response_sender()
        try:
            job = parse_inputs(read_inputs(request, pb_utils), self.tokenizer, self.spec, self.default_max_tokens)
            sink = ResponseSink(sender, pb_utils, job.stream)
            sink.request = Request([job.prompt], job.settings, sink)
            self.scheduler.submit(sink.request)
        except (InputError, EngineError) as error:  # Overloaded is an EngineError
            send_reply(sender, Reply(error=str(error), final=True), pb_utils)

    def finalize(self) -> None:
        if getattr(self, "metrics", None) is not None:
            self.metrics.stop()
        scheduler = getattr(self, "scheduler", None)
        if scheduler is not None:
            scheduler.stop()
