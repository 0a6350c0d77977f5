"""Execution providers that ship as onnxruntime plugin libraries, registered at run time rather than built
into the onnxruntime wheel.

    webgpu  onnxruntime-ep-webgpu (Dawn over Vulkan / Metal / D3D12)

A plugin EP is registered once per process (`ort.register_execution_provider_library`), then a session
takes one of its devices with `SessionOptions.add_provider_for_devices`; onnxruntime's CPU provider runs
what the plugin does not take (for WebGPU: the `Loop` node itself, which has no WebGPU kernel, and a few
shape ops; the Loop body's nodes, its `If`s included, run on the GPU). A software adapter (Mesa's lavapipe:
correct, ~50x slower than the CPU provider) is only offered when the user asks for it, by setting
ORT_WEBGPU_EP_ALLOW_SOFTWARE_ADAPTER=1 before the first registration (`allow_software_adapter()`); it is
never picked silently. With it set the plugin lists the CPU itself as a device, so a missing Vulkan driver
shows only when a session asks Dawn for an adapter (`session_failure` turns that into the same message).
"""
from __future__ import annotations

import importlib
import os
import tempfile

PLUGINS: dict[str, tuple[str, str, str]] = {
    # short name: (python module, onnxruntime provider name, pip package)
    "webgpu": ("onnxruntime_ep_webgpu", "WebGpuExecutionProvider", "onnxruntime-ep-webgpu"),
}
SOFTWARE_ENV = "ORT_WEBGPU_EP_ALLOW_SOFTWARE_ADAPTER"
_registered: set[str] = set()


class PluginUnavailable(Exception):
    """The plugin package is missing, fails to register, or offers no device (one-line message)."""


def allow_software_adapter() -> None:
    """Let the WebGPU plugin list a software adapter (lavapipe); only effective before its registration."""
    if "webgpu" in _registered and os.environ.get(SOFTWARE_ENV) != "1":
        raise PluginUnavailable("the WebGPU plugin is already registered in this process without software "
                                f"adapters; set {SOFTWARE_ENV}=1 before the first webgpu session")
    os.environ[SOFTWARE_ENV] = "1"


def is_registered(ep: str) -> bool:
    return ep in _registered


def plugin_device(ep: str):
    """The OrtEpDevice of plugin EP `ep`, registering the plugin library on first use."""
    import onnxruntime as ort

    module, provider, package = PLUGINS[ep]
    if ep not in _registered:
        try:
            lib = importlib.import_module(module).get_library_path()
        except ImportError:
            raise PluginUnavailable(f"execution provider '{ep}' needs the plugin package: pip install {package}") \
                from None
        if not os.environ.get("XDG_RUNTIME_DIR"):  # Dawn's Vulkan loader wants one; a private temp dir will do
            os.environ["XDG_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="edgeloop-xdg-")
        try:
            ort.register_execution_provider_library(ep, str(lib))
        except Exception as e:  # onnxruntime raises its own exception types
            raise PluginUnavailable(f"execution provider '{ep}': {package} failed to register "
                                    f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})") from None
        _registered.add(ep)
    devices = [d for d in ort.get_ep_devices() if d.ep_name == provider]
    if not devices:
        raise PluginUnavailable(no_adapter(ep))
    gpus = [d for d in devices if d.device.type == ort.OrtHardwareDeviceType.GPU]
    return (gpus or devices)[0]


def no_adapter(ep: str) -> str:
    """The one-line 'no WebGPU adapter found' message, with the hint that fits the environment."""
    if os.environ.get(SOFTWARE_ENV) == "1":
        hint = ("; software adapters are allowed, but Vulkan offers none: install Mesa's lavapipe "
                "(mesa-vulkan-drivers >= 25, scripts/system-deps.sh)")
    else:
        hint = f"; for a software adapter (Mesa lavapipe, slow but exact) set {SOFTWARE_ENV}=1"
    return (f"execution provider '{ep}': no WebGPU adapter found "
            f"(needs a GPU with Vulkan, Metal or D3D12 drivers{hint})")


def session_failure(ep: str, error: str) -> str | None:
    """A clear one-line message for a session that plugin `ep` failed to create, or None when the error is
    not the plugin's. With software adapters allowed the plugin lists the CPU itself as its device, so a
    missing Vulkan driver only shows when the session asks Dawn for an adapter."""
    if ep == "webgpu" and "Failed to get a WebGPU adapter" in error:
        return no_adapter(ep)
    return None


def device_description(dev) -> str:
    """'GPU AMD (WebGpuExecutionProvider 0.4.0)' and the like, for reports."""
    kind = str(dev.device.type).rsplit(".", 1)[-1]
    version = dev.ep_metadata.get("version", "") if hasattr(dev.ep_metadata, "get") else ""
    software = " software adapter" if kind == "CPU" else ""
    return f"{kind}{software} {dev.device.vendor} ({dev.ep_name} {version})".strip()
