"""Repack a MoE GGUF for expert streaming: fused gate+up experts, a profile-guided expert order, and
exactly the function of the input.

llama.cpp streams the used experts of a host-resident block to the GPU one run of adjacent expert
ids at a time (ggml-backend.cpp, "group consecutive experts and copy them together"), one copy per
run and per expert tensor. So the converter

- fuses ffn_gate_exps + ffn_up_exps into ffn_gate_up_exps (per expert: its gate rows, then its up
  rows), where the arch's loader reads the fused tensor: one copy instead of two;
- with a routing profile, reorders each block's experts so that experts selected together sit next
  to each other (see `order_experts`), and permutes every per-expert tensor (router rows, expert
  scales) the same way, so the model computes the same function.

Every change moves whole rows, which is exact for every block format: nothing is dequantized, and
all other tensors are copied byte for byte. The plan (`plan_conversion`) is pure: each output tensor
is a list of byte ranges of the input. Writing follows fixed, checked steps (`GGUFFileWriter`):
temp file next to OUT -> header -> tensor data -> fsync -> rename.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError
from ..inventory import read_inventory
from ..log import logger
from ..profile_io import load_profile
from ..units import human_bytes
from .conversion_plan import ConversionPlan, plan_conversion
from .expert_order import copies_per_token, order_experts, pair_probabilities
from .writer import GGUFFileWriter, Interrupted, remove_stale_temps, signals_blocked, signals_raise, temp_path

__all__ = ["ConversionPlan", "ConvertResult", "Interrupted", "convert", "copies_per_token", "order_experts",
           "pair_probabilities", "plan_conversion", "temp_path"]

DISK_MARGIN = 16 * 2**20  # free space wanted beyond the output's size (file-system metadata)

if TYPE_CHECKING:
    from ..verify import VerifyResult


# --- the command ---------------------------------------------------------------------------------
@dataclass
class ConvertResult:
    plan: ConversionPlan
    output: Path
    bytes_written: int
    seconds: float  # writing, fsync included (not the verification)
    stale_removed: list[Path]
    verification: VerifyResult | None = None  # when verified


def convert(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    profile: str | os.PathLike | None = None,
    force: bool = False,
    verify: bool = False,
    show_progress: bool = True,
) -> ConvertResult:
    """Repack `source` into `output`. With `verify`, the new file is checked against the input
    with llama.cpp before it is renamed into place."""
    source, output = Path(source), Path(output)
    stale = remove_stale_temps(output.parent)
    for p in stale:
        logger.info("removed %s, left by an interrupted conversion", p.name)
    inv = read_inventory(source)
    plan = plan_conversion(inv, load_profile(profile, inv) if profile is not None else None)
    _check_output(source, output, force)
    header = plan.header()
    total = plan.file_bytes(len(header))

    writer = GGUFFileWriter(output, header, plan.data_offsets(), total, plan.alignment)
    t0 = time.perf_counter()
    verification = None
    with open(source, "rb", buffering=0) as src, signals_raise():
        try:
            writer.open()
            _check_free_space(output, total)
            writer.write_header()
            with _progress(show_progress) as progress:
                task = progress.add_task(f"writing {output.name}", total=sum(t.nbytes for t in plan.tensors))
                for t in plan.tensors:
                    writer.write_tensor(t, src.fileno(), lambda n: progress.advance(task, n))
            writer.sync()
            seconds = time.perf_counter() - t0
            if verify:
                from ..verify import OutputsDiffer, verify_models

                verification = verify_models(source, writer.named())
                if not verification.passed:
                    raise OutputsDiffer(f"{output.name} was not written: {verification.summary()}")
            with signals_blocked():  # in place and durable, or not there at all
                writer.commit()
        except OSError as e:
            with signals_blocked():
                writer.discard()
            raise UserError(f"could not write {output}: {_os_error(e)}") from None
        except Interrupted as e:
            with signals_blocked():
                writer.discard()
            e.args = (f"{e.args[0]}: {output} " + ("was complete before it" if writer.done else "was not written"),)
            raise
        except BaseException:
            with signals_blocked():
                writer.discard()
            raise
    return ConvertResult(plan, output, total, seconds, stale, verification)


def _check_free_space(output: Path, total: int) -> None:
    free = shutil.disk_usage(output.parent).free
    if free < total + DISK_MARGIN:
        raise UserError(f"not enough free space in {output.parent}: the output needs {human_bytes(total)}, {human_bytes(free)} free")


def _os_error(e: OSError) -> str:
    """An OS error in words, with what to do for the usual ones."""
    hints = {
        errno.EROFS: "the destination is on a read-only file system",
        errno.EACCES: "no permission to write there",
        errno.EPERM: "no permission to write there",
        errno.ENOSPC: "no space left on the device",
        errno.EDQUOT: "disk quota exceeded",
    }
    return hints.get(e.errno) or e.strerror or str(e)


def _check_output(source: Path, output: Path, force: bool) -> None:
    if output.is_dir():
        raise UserError(f"{output} is a folder; give the path of the new .gguf file")
    if not output.parent.is_dir():
        raise UserError(f"{output.parent}: no such folder")
    if output.exists():
        if os.path.samefile(source, output):
            raise UserError(f"{output} is the input file; write the converted model to a new file")
        if not force:
            raise UserError(f"{output} exists; pass --force to overwrite it")


def _progress(show: bool):
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from ..log import stderr

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=stderr,
        disable=not (show and stderr.is_terminal),
    )
