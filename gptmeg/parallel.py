"""Device maps for splitting GPTMeg's blocks over several devices (``parallelize``)."""

from __future__ import annotations

from typing import Mapping, Sequence, Union

import torch

DeviceLike = Union[str, int, torch.device]
DeviceMap = Mapping[DeviceLike, Sequence[int]]

__all__ = ["DeviceMap", "balanced_device_map", "check_device_map"]


def _as_device(device: DeviceLike) -> torch.device:
    return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)


def balanced_device_map(n_blocks: int, devices: Sequence[DeviceLike]) -> dict[torch.device, list[int]]:
    """Contiguous, balanced split of ``n_blocks`` blocks over ``devices`` (earlier devices take the remainder)."""
    if not devices:
        raise ValueError("balanced_device_map needs at least one device.")
    devices = devices[:n_blocks] if n_blocks else devices[:1]
    per_device, extra = divmod(n_blocks, len(devices))
    device_map, start = {}, 0
    for i, device in enumerate(devices):
        count = per_device + (1 if i < extra else 0)
        device_map[_as_device(device)] = list(range(start, start + count))
        start += count
    return device_map


def check_device_map(device_map: DeviceMap, n_blocks: int) -> dict[torch.device, list[int]]:
    """Normalise a user device map and check that it assigns every block exactly once, in order."""
    normalised: dict[torch.device, list[int]] = {}
    for device, blocks in device_map.items():
        try:
            key = _as_device(device)
        except (RuntimeError, TypeError) as error:
            raise ValueError(f"device_map key {device!r} is not a torch device: {error}") from None
        if key in normalised:
            raise ValueError(f"device_map names device {key} twice; give each device one list of blocks.")
        normalised[key] = [int(b) for b in blocks]
    assigned = [b for blocks in normalised.values() for b in blocks]
    if sorted(assigned) != list(range(n_blocks)):
        missing = sorted(set(range(n_blocks)) - set(assigned))
        duplicated = sorted({b for b in assigned if assigned.count(b) > 1})
        extra = sorted(b for b in set(assigned) if not 0 <= b < n_blocks)
        raise ValueError(
            f"device_map must assign each of the {n_blocks} blocks (0..{n_blocks - 1}) exactly once; "
            f"missing {missing}, duplicated {duplicated}, out of range {extra}."
        )
    if assigned != list(range(n_blocks)):
        raise ValueError("device_map must list blocks in order (device 1 gets the first blocks, and so on).")
    return normalised
