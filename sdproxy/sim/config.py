"""Sim: the behaviour of one simulated sd-webui pod, as frozen data (``sdproxy sim`` flags).

Where several pods run in one process they share one ``SimConfig``; each pod derives its
own random stream from ``seed`` and its index.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_CHECKPOINT = "v1-5-pruned-emaonly.safetensors"


@dataclass(frozen=True, kw_only=True)
class SimConfig:
    #: milliseconds of one sampling step of one 512×512 image (100 ≈ an A10: 20 steps ≈ 2 s)
    step_ms: float = 100.0
    #: worker threads: every request holds one for its whole life (uvicorn/anyio pool: 40)
    threads: int = 40
    #: checkpoint file names; the first is loaded at start and is the default
    checkpoints: tuple[str, ...] = (DEFAULT_CHECKPOINT,)
    #: seconds to load another checkpoint (docs/sd-webui.md: 2–7 s from fast disk)
    switch_s: float = 3.0
    #: seconds until the model is loaded; HTTP answers at once, heavy work waits
    startup_s: float = 0.0
    #: out of memory above this many batch_size × width × height pixels in one pass
    vram_pixels: int = 4 * 1024 * 1024
    #: probability that a generation fails with a 500 (NaN in the UNet)
    fail_rate: float = 0.0
    #: seed for failures, lock order, seeds and task ids; None draws from the OS
    seed: int | None = None
    #: serve sd-webui's browser UI too: a real Gradio 3.41 app (sdproxy.sim.ui)
    ui: bool = False

    def __post_init__(self) -> None:
        if self.step_ms < 0 or self.switch_s < 0 or self.startup_s < 0:
            raise ValueError("step_ms, switch_s and startup_s must be >= 0")
        if self.threads < 1:
            raise ValueError("threads must be >= 1")
        if not self.checkpoints or any(not name.strip() for name in self.checkpoints):
            raise ValueError("checkpoints must name at least one checkpoint")
        if len(set(self.checkpoints)) != len(self.checkpoints):
            raise ValueError("checkpoints must be distinct")
        if not 0.0 <= self.fail_rate <= 1.0:
            raise ValueError("fail_rate must be within 0..1")
        if self.vram_pixels < 1:
            raise ValueError("vram_pixels must be >= 1")

    @property
    def step_s(self) -> float:
        """Seconds per 512×512-step unit."""
        return self.step_ms / 1000.0
