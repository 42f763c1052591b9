"""`python -m vascdist.bench.highrate FILE write|read`: write a 10-minute 192 kHz 24-bit mono WAV, or time
load_audio_stats on it and report its peak RSS (run each read in a fresh process)."""
import resource, sys, time, numpy as np, soundfile as sf
from vascdist.config import AudioConfig
from vascdist.data.audio import load_audio_stats
path = sys.argv[1]
if sys.argv[2] == "write":
    rate, n = 192000, 192000 * 600
    with sf.SoundFile(path, "w", rate, 1, subtype="PCM_24") as fh:
        rng = np.random.default_rng(0)
        for i in range(0, n, 1 << 20):
            m = min(1 << 20, n - i)
            fh.write(0.1 * rng.standard_normal(m))
    sys.exit()
t = time.perf_counter()
x, st = load_audio_stats(path, AudioConfig())
dt = time.perf_counter() - t
print(f"samples out {len(x)} ({len(x)/4000:.0f} s at 4 kHz), {dt:.1f} s, peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024:.0f} MiB")
