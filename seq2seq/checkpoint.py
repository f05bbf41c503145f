"""The checkpoint file format: safe loading, pruning, averaging and RNG state.

A checkpoint is one ``torch.save`` of a plain dict (tensors, dicts, lists, str, int, float,
bool, bytes, None) so that it loads with ``torch.load(..., weights_only=True)``: loading a file
never runs pickled code. Payload keys: ``format="seq2seq"``, ``version``, ``recipe`` (dict),
``model`` (state_dict), ``optimizer``, ``scaler``, ``rng`` and ``rng_ranks`` (every rank's),
``step``, ``elapsed``, ``best``, ``bad_validations``, ``data_position`` (the epoch and the
position in it), ``metrics``, ``tokenizer`` (``{"kind": str, "data": bytes}``), ``vocab_size``.
Every key is read by ``train --resume`` or by inference; nothing is written for show.
"""

from __future__ import annotations

import logging
import pickle
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from seq2seq.files import atomic_write

FORMAT = "seq2seq"
VERSION = 1
STEP_PATTERN = re.compile(r"^step_(\d+)\.pt$")

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or used; the message names the file and the fix."""


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically (:func:`atomic_write`), creating its directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as handle:
        torch.save(payload, handle)
    log.debug("saved checkpoint %s", path)


def _corrupt(path: Path, error: BaseException) -> CheckpointError:
    reason = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
    return CheckpointError(
        f"{path}: corrupt or truncated checkpoint ({reason}); "
        "use last.pt/best.pt or an earlier checkpoint"
    )


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu",
                    mmap: bool = False) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` with ``weights_only=True``.

    ``mmap`` maps the tensors from the file instead of reading them: inference, which needs only
    the model weights, then never reads the optimizer state (twice the model's size with Adam).

    Raises :class:`CheckpointError` (one line naming the file) when it is missing, truncated or
    corrupt, or is not a seq2seq checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file; check the path or run directory")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except PermissionError:
        raise CheckpointError(f"{path}: permission denied; make the file readable") from None
    except pickle.UnpicklingError as error:
        if "weights only" in str(error).lower():  # loads only with arbitrary code: not ours
            raise CheckpointError(
                f"{path}: not a seq2seq checkpoint (it holds pickled objects that are unsafe to "
                "load); pass a file written by 'seq2seq train'"
            ) from None
        raise _corrupt(path, error) from None
    except Exception as error:  # zip, EOF, OSError, KeyError...: torch.load's ways of failing
        raise _corrupt(path, error) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not a seq2seq checkpoint (no format='{FORMAT}' entry); "
            "pass a file written by 'seq2seq train'"
        )
    version = payload.get("version", VERSION)
    if not isinstance(version, int) or version > VERSION:
        raise CheckpointError(
            f"{path}: checkpoint version {version!r} is not one this seq2seq reads "
            f"(up to {VERSION}); upgrade seq2seq"
        )
    return payload


def step_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` for every ``step_<N>.pt`` in ``directory``, oldest first."""
    found = []
    for entry in Path(directory).iterdir():
        match = STEP_PATTERN.match(entry.name)
        if match and entry.is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def prune_checkpoints(directory: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` step checkpoints; best.pt/last.pt are kept.

    Returns the removed paths. ``keep_last <= 0`` keeps none of the step files.
    """
    steps = step_checkpoints(directory)
    doomed = [path for _, path in steps[: max(len(steps) - max(keep_last, 0), 0)]]
    for path in doomed:
        path.unlink(missing_ok=True)
        log.debug("removed old checkpoint %s", path)
    return doomed


def average_checkpoints(paths: Sequence[str | Path]) -> dict[str, Any]:
    """Average the model weights of several checkpoints (Polyak/Junczys-Dowmunt style).

    Float tensors in ``payload["model"]`` are averaged in float64 and cast back; integer
    tensors and every other key come from the last checkpoint. All checkpoints must have the
    same parameter names and shapes; an error names the first file that differs.
    """
    if not paths:
        raise CheckpointError("average_checkpoints needs at least one checkpoint path")
    last = load_checkpoint(paths[-1])
    reference = last["model"]
    sums = {k: v.to(torch.float64) for k, v in reference.items() if v.is_floating_point()}
    for path in paths[:-1]:
        model = load_checkpoint(path)["model"]
        if set(model) != set(reference):
            odd = sorted(set(model) ^ set(reference))[:3]
            raise CheckpointError(
                f"{path}: parameter names differ from {paths[-1]} (e.g. {odd}); "
                "average checkpoints of the same run only"
            )
        for name, tensor in model.items():
            if tensor.shape != reference[name].shape:
                raise CheckpointError(
                    f"{path}: parameter {name} has shape {tuple(tensor.shape)}, "
                    f"{paths[-1]} has {tuple(reference[name].shape)}; average the same model only"
                )
            if name in sums:
                sums[name] += tensor.to(torch.float64)
    averaged = dict(reference)
    for name, total in sums.items():
        averaged[name] = (total / len(paths)).to(reference[name].dtype)
    return {**last, "model": averaged}


def check_weights_fit(path: str | Path, weights: dict[str, torch.Tensor],
                      expected: dict[str, torch.Tensor], fix: str) -> None:
    """Raise :class:`CheckpointError` naming ``path`` and the first parameter of ``expected`` (a
    state_dict) that ``weights`` lacks or shapes differently, or else the first extra one."""
    for name, tensor in expected.items():
        if name not in weights:
            raise CheckpointError(f"{path}: no parameter {name}, which the model needs; {fix}")
        if weights[name].shape != tensor.shape:
            raise CheckpointError(f"{path}: parameter {name} has shape "
                                  f"{tuple(weights[name].shape)}, the model needs "
                                  f"{tuple(tensor.shape)}; {fix}")
    extra = [name for name in weights if name not in expected]
    if extra:
        raise CheckpointError(f"{path}: parameter {extra[0]} has no place in the model; {fix}")


def rng_state() -> dict[str, Any]:
    """Python ``random``, torch CPU and (when present) CUDA RNG states as plain data."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (CUDA only if both sides have it)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = [s.cpu() for s in state["cuda"]]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            log.warning("checkpoint has %d CUDA RNG states, this machine has %d devices; "
                        "CUDA RNG not restored", len(cuda_states), torch.cuda.device_count())
