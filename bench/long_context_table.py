"""Table and SVG plot for bench/long-context.sh (standard library only).

Usage: python3 bench/long_context_table.py RESULTS.jsonl OUT.svg
"""
import json
import statistics
import sys

rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
ts = sorted({r["seq_len"] for r in rows})


def cell(t, k):
    return [r for r in rows if r["seq_len"] == t and r["kernel"] == k]


def fmt(x):
    return f"{x:,.0f}"


print("| T | stored tokens/s (rounds) | tiled tokens/s (rounds) | median ratio tiled/stored | stored peak MiB | tiled peak MiB |")
print("|---|---|---|---|---|---|")
series = {"stored": [], "tiled": []}
for t in ts:
    parts = []
    med = {}
    for k in ("stored", "tiled"):
        c = cell(t, k)
        if c:
            med[k] = statistics.median(r["tokens_per_s"] for r in c)
            peak = max(r["peak_rss_mib"] for r in c)
            series[k].append((t, peak))
            parts.append((" / ".join(fmt(r["tokens_per_s"]) for r in c), fmt(peak)))
        else:
            parts.append(("—", "—"))
    ratio = f"{med['tiled'] / med['stored']:.2f}" if len(med) == 2 else "—"
    print(f"| {t:,} | {parts[0][0]} | {parts[1][0]} | {ratio} | {parts[0][1]} | {parts[1][1]} |")

# the plot: peak memory against T, linear axes (a straight line is linear growth)
W, H, L, R, TOP, BOT = 640, 400, 70, 150, 40, 50
xmax = max(ts)
ymax = max(p for s in series.values() for _, p in s)
ystep = 1000 if ymax > 2000 else 250
ytop = (int(ymax / ystep) + 1) * ystep


def px(t):
    return L + (W - L - R) * t / xmax


def py(m):
    return H - BOT - (H - TOP - BOT) * m / ytop


svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
       f'<rect width="{W}" height="{H}" fill="white"/>',
       f'<text x="{W / 2 - 60}" y="22" font-size="14">Training peak memory by sequence length (small-moe, batch 1)</text>'.replace(f'x="{W / 2 - 60}"', 'x="60"')]
for y in range(0, ytop + 1, ystep):
    svg.append(f'<line x1="{L}" y1="{py(y):.1f}" x2="{W - R}" y2="{py(y):.1f}" stroke="#ddd"/>')
    svg.append(f'<text x="{L - 8}" y="{py(y) + 4:.1f}" text-anchor="end">{y:,}</text>')
for t in ts:
    svg.append(f'<line x1="{px(t):.1f}" y1="{H - BOT}" x2="{px(t):.1f}" y2="{H - BOT + 5}" stroke="black"/>')
    if t >= 2048:
        svg.append(f'<text x="{px(t):.1f}" y="{H - BOT + 18}" text-anchor="middle">{t:,}</text>')
svg.append(f'<line x1="{L}" y1="{H - BOT}" x2="{W - R}" y2="{H - BOT}" stroke="black"/>')
svg.append(f'<line x1="{L}" y1="{TOP}" x2="{L}" y2="{H - BOT}" stroke="black"/>')
svg.append(f'<text x="{(L + W - R) / 2}" y="{H - 12}" text-anchor="middle">sequence length T (tokens)</text>')
svg.append(f'<text x="16" y="{(TOP + H - BOT) / 2}" transform="rotate(-90 16 {(TOP + H - BOT) / 2})" text-anchor="middle">peak RSS (MiB)</text>')
colors = {"stored": "#d62728", "tiled": "#1f77b4"}
names = {"stored": "stored probabilities (T x T)", "tiled": "tiled (FlashAttention-2)"}
for i, (k, pts) in enumerate(series.items()):
    if not pts:
        continue
    path = " ".join(f"{px(t):.1f},{py(m):.1f}" for t, m in pts)
    svg.append(f'<polyline points="{path}" fill="none" stroke="{colors[k]}" stroke-width="2"/>')
    for t, m in pts:
        svg.append(f'<circle cx="{px(t):.1f}" cy="{py(m):.1f}" r="3" fill="{colors[k]}"/>')
    ly = TOP + 20 + 22 * i
    svg.append(f'<line x1="{W - R + 10}" y1="{ly}" x2="{W - R + 30}" y2="{ly}" stroke="{colors[k]}" stroke-width="2"/>')
    svg.append(f'<text x="{W - R + 34}" y="{ly + 4}" font-size="10">{names[k]}</text>')
svg.append("</svg>")
open(sys.argv[2], "w").write("\n".join(svg) + "\n")
print(f"\nplot: {sys.argv[2]}")
