"""The device object for a plan's device entry, by its kind (each device module imported on use)."""

from __future__ import annotations

from mobile_export.errors import UserError

from . import Device


def make_device(spec) -> Device:
    """The device object for a plan's device entry."""
    kind = spec.kind
    if kind == "host":
        from .host import HostDevice

        return HostDevice(spec)
    if kind == "android":
        from .android import AndroidDevice

        return AndroidDevice(spec)
    if kind == "ios":
        from .ios import IOSDevice

        return IOSDevice(spec)
    if kind == "devicefarm":
        from .devicefarm import DeviceFarmDevice

        return DeviceFarmDevice(spec)
    raise UserError(f"unknown device kind '{kind}'", hint="use host, android, ios or devicefarm")
