"""Autocast: a forward pass's autocast setting, captured so a recomputation or backward can re-enter it."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Autocast:
    device_type: str
    dtype: torch.dtype
    enabled: bool

    @classmethod
    def capture(cls, device: torch.device) -> Autocast:
        kind = device.type
        return cls(kind, torch.get_autocast_dtype(kind), torch.is_autocast_enabled(kind))

    def context(self) -> torch.autocast:
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)
