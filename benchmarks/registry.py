"""The one registry of benchmark shapes: latents at the resolutions the paper trains.

Each entry is a prediction tensor [2B, ...] (winners then losers) in bfloat16.
"""

KERNEL_SHAPES = {
    # name: (shape [2B, ...], what it is)
    "sd15-512px": ((32, 4, 64, 64), "SD1.5 512px latents, B=16"),
    "sdxl-1024px": ((16, 4, 128, 128), "SDXL 1024px latents, B=8"),
    "sd3-1024px": ((16, 16, 128, 128), "SD3.5 1024px latents, B=8"),
    "flux-1024px": ((16, 4096, 64), "FLUX.1 packed 1024px latents, B=8"),
    "wan-720p-b1": ((2, 16, 21, 90, 160), "Wan2.1 720p 81-frame latents, B=1"),
    "wan-720p-b2": ((4, 16, 21, 90, 160), "Wan2.1 720p 81-frame latents, B=2"),
}

# Tiny shapes for the CPU smoke run of the harness (checks the script, not speed).
SMOKE_SHAPES = {
    "smoke-image": ((4, 4, 8, 8), "tiny image latents, B=2"),
    "smoke-video": ((2, 4, 3, 4, 6), "tiny video latents, B=1"),
}
