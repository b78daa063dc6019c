"""A task whose memory grows: ``python memhog.py PEAK_MB GROW_S [IDLE_S] [HOLD_S]``.

Idles for IDLE_S, then allocates (and touches) memory in steps to reach PEAK_MB
over GROW_S seconds, holds it for HOLD_S, and exits 0.
"""

import sys
import time

peak_mb, grow_s = int(sys.argv[1]), float(sys.argv[2])
idle_s = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
hold_s = float(sys.argv[4]) if len(sys.argv) > 4 else 0.5
time.sleep(idle_s)
steps = 20
chunk = peak_mb * 2**20 // steps
held = []
for _ in range(steps):
    held.append(b"x" * chunk)
    time.sleep(grow_s / steps)
time.sleep(hold_s)
print(f"held {sum(map(len, held)) >> 20} MB")
