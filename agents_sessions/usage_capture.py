"""Token usage captured from the run's context: per request, exactly once.

The Runner passes its ``RunContextWrapper`` to every session call; its ``usage``
grows by one ``RequestUsage`` entry per model request. Each append records the
entries not recorded yet, keyed by ``(run id, position)`` (a unique index), in the
append's transaction: a retried append, or an explicit ``record_usage`` of the same
run later, writes no request twice. The bookkeeping lives on the wrapper itself
(:data:`RUN_USAGE_ATTRIBUTE`), so it ends with the run.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from .repositories import Repositories, UsageEntry

#: Where a run's usage bookkeeping lives on its RunContextWrapper.
RUN_USAGE_ATTRIBUTE = "_agents_sessions_run_usage"


@dataclass
class RunUsage:
    """What of one run's usage is recorded: the run id and how far (per wrapper)."""

    run_id: str
    entries: int
    requests: int


def observe_run(wrapper: Any, *, from_start: bool) -> RunUsage | None:
    """The run's usage bookkeeping, started on first sight.

    First seen by the session (the Runner reads history before the first model call),
    nothing of the run is recorded yet. A run resumed from a saved state carries the
    usage of its earlier part, recorded by the earlier run: it is the baseline.
    ``from_start`` (an explicit ``record_usage``) counts from the run's first request.
    """
    usage = getattr(wrapper, "usage", None)
    if usage is None:
        return None
    mark = getattr(wrapper, RUN_USAGE_ATTRIBUTE, None)
    if isinstance(mark, RunUsage):
        return mark
    entries = list(getattr(usage, "request_usage_entries", None) or [])
    mark = RunUsage(
        run_id=uuid.uuid4().hex,
        entries=0 if from_start else len(entries),
        requests=0 if from_start else int(usage.requests or 0),
    )
    try:
        setattr(wrapper, RUN_USAGE_ATTRIBUTE, mark)
    except (AttributeError, TypeError):  # pragma: no cover - a frozen custom wrapper
        return None
    return mark


def _details(value: Any) -> dict[str, Any] | None:
    # The SDK stores `details.__dict__` (AdvancedSQLiteSession); the same here.
    if value is None:
        return None
    fields = getattr(value, "__dict__", None)
    return dict(fields) if isinstance(fields, dict) else None


def pending_usage(
    wrapper: Any,
    mark: RunUsage,
    *,
    model: str,
    response_ids: list[str | None] | None = None,
) -> tuple[list[UsageEntry], int, int]:
    """The run's requests not recorded yet, one entry each, keyed by their position.

    Returns the entries and the (entries, requests) counts they bring the run to.
    Requests that reported no tokens have no entry of their own in the SDK's usage;
    they are recorded as one row of ``requests`` and no tokens (negative key).
    """
    usage = wrapper.usage
    entries = list(getattr(usage, "request_usage_entries", None) or [])
    requests = int(usage.requests or 0)
    pending: list[UsageEntry] = []
    for index in range(mark.entries, len(entries)):
        request = entries[index]
        input_details = _details(request.input_tokens_details)
        output_details = _details(request.output_tokens_details)
        response_id = None
        if response_ids is not None and len(response_ids) == len(entries):
            response_id = response_ids[index]
        pending.append(
            UsageEntry(
                model=model,
                prompt_tokens=int(request.input_tokens or 0),
                completion_tokens=int(request.output_tokens or 0),
                total_tokens=int(request.total_tokens or 0),
                requests=1,
                run_id=mark.run_id,
                response_id=response_id,
                request_index=index,
                cached_tokens=int((input_details or {}).get("cached_tokens") or 0),
                reasoning_tokens=int((output_details or {}).get("reasoning_tokens") or 0),
                input_tokens_details=input_details,
                output_tokens_details=output_details,
            )
        )
    silent = (requests - mark.requests) - (len(entries) - mark.entries)
    if silent > 0 and not entries:
        # A usage without per-request entries (built by hand, or by a model that
        # reports totals only): the run's totals, as one row.
        input_details = _details(usage.input_tokens_details)
        output_details = _details(usage.output_tokens_details)
        pending.append(
            UsageEntry(
                model=model,
                prompt_tokens=int(usage.input_tokens or 0),
                completion_tokens=int(usage.output_tokens or 0),
                total_tokens=int(usage.total_tokens or 0),
                requests=silent,
                run_id=mark.run_id,
                request_index=-requests,
                cached_tokens=int((input_details or {}).get("cached_tokens") or 0),
                reasoning_tokens=int((output_details or {}).get("reasoning_tokens") or 0),
                input_tokens_details=input_details,
                output_tokens_details=output_details,
            )
        )
    elif silent > 0:
        pending.append(
            UsageEntry(
                model=model,
                requests=silent,
                total_tokens=0,
                run_id=mark.run_id,
                request_index=-requests,
            )
        )
    return pending, len(entries), requests


def record_turn_usage(repos: Repositories, conversation_id: str, entries: list[UsageEntry]) -> int:
    """Record entries against the current branch's current turn (in the caller's transaction)."""
    branch_id = repos.branches.current(conversation_id)
    turn = repos.branches.latest_user_message(conversation_id, branch_id)
    return repos.usage.record(conversation_id, entries, branch_id=branch_id, turn_message_id=turn)


def combined_entry(entries: list[UsageEntry]) -> UsageEntry:
    """One row for several requests of a run (``record_usage(per_request=False)``)."""
    first = entries[0]

    def total(field: str) -> int:
        return sum(int(getattr(entry, field) or 0) for entry in entries)

    def details(field: str) -> dict[str, Any] | None:
        merged: dict[str, Any] | None = None
        for entry in entries:
            value = getattr(entry, field)
            if isinstance(value, dict):
                merged = dict(merged or {})
                for key, number in value.items():
                    merged[key] = merged.get(key, 0) + (number or 0)
        return merged

    return UsageEntry(
        model=first.model,
        prompt_tokens=total("prompt_tokens"),
        completion_tokens=total("completion_tokens"),
        total_tokens=total("total_tokens"),
        requests=total("requests"),
        run_id=first.run_id,
        request_index=first.request_index,
        cached_tokens=total("cached_tokens"),
        reasoning_tokens=total("reasoning_tokens"),
        input_tokens_details=details("input_tokens_details"),
        output_tokens_details=details("output_tokens_details"),
    )


def model_name(result: Any) -> str:
    """The model a run used, as best the result tells: the last agent's model."""
    model = getattr(getattr(result, "last_agent", None), "model", None)
    if isinstance(model, str) and model:
        return model
    if model is not None:
        name = getattr(model, "model", None)  # e.g. OpenAIResponsesModel.model
        return name if isinstance(name, str) and name else type(model).__name__
    try:
        from agents.models import get_default_model

        return str(get_default_model())
    except ImportError:  # pragma: no cover - the SDK provides it
        return "unknown"


def usage_entry(
    usage: Any, *, model: str, run_id: str, response_id: str | None = None
) -> UsageEntry:
    """A ``usage_logs`` row from an SDK ``Usage`` (of one request, or a whole run)."""
    return UsageEntry(
        model=model,
        prompt_tokens=int(usage.input_tokens or 0),
        completion_tokens=int(usage.output_tokens or 0),
        total_tokens=int(usage.total_tokens or 0),
        # A request's Usage may leave `requests` at 0; it still was one request.
        requests=max(int(usage.requests or 0), 1 if response_id is not None else 0),
        run_id=run_id,
        response_id=response_id,
    )
