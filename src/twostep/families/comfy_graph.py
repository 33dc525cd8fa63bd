"""ComfyUI API-format graphs, whatever the family: links, a topological order, a left-to-right layout and a
picture (``draw_workflow``). A graph is ``{node_id: {"class_type", "inputs", "_meta": {"title"}}}``, a link
``[source_node_id, output_index]``. Each family's ``comfy_workflow.py`` builds its own graph with these."""

from __future__ import annotations


def number(value: float) -> str:
    """A sigma as ComfyUI's ManualSigmas parses it (digits and a point, no exponent)."""
    text = f"{value:.10f}".rstrip("0").rstrip(".")
    return text or "0"


def count(n: int) -> str:
    return {1: "one", 2: "two", 3: "three", 4: "four"}.get(n, str(n))


def links(graph: dict) -> list[tuple[str, int, str, str]]:
    """Every link as ``(source id, output index, target id, input name)``."""
    out = []
    for node_id, node in graph.items():
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                out.append((str(value[0]), int(value[1]), node_id, name))
    return out


def topological_order(graph: dict) -> list[str]:
    """Node ids, every node after the nodes it reads from (ties by id). Raises on a cycle or a dangling link."""
    sources = {node_id: set() for node_id in graph}
    for src, _, dst, name in links(graph):
        if src not in graph:
            raise ValueError(f"node {dst} input {name!r} links to missing node {src}")
        sources[dst].add(src)
    order, done = [], set()
    while len(order) < len(graph):
        ready = sorted((n for n in graph if n not in done and sources[n] <= done), key=_id_key)
        if not ready:
            raise ValueError("the workflow has a cycle")
        order += ready
        done.update(ready)
    return order


def _id_key(node_id: str):
    return (0, int(node_id), "") if node_id.isdigit() else (1, 0, node_id)


def layout(graph: dict) -> dict[str, tuple[int, int]]:
    """``{node: (column, row)}``, left to right: a node sits one column right of its furthest input, a node with no
    inputs (a loader, a constant) one column left of its first use; rows follow the mean row of the neighbours."""
    order = topological_order(graph)
    edges = links(graph)
    consumers = {n: [dst for src, _, dst, _ in edges if src == n] for n in graph}
    producers = {n: [src for src, _, dst, _ in edges if dst == n] for n in graph}
    col = {}
    for n in order:
        col[n] = 1 + max((col[p] for p in producers[n]), default=-1)
    for n in order:
        if not producers[n] and consumers[n]:
            col[n] = min(col[c] for c in consumers[n]) - 1
    row = {n: float(i) for i, n in enumerate(order)}
    for _ in range(6):  # barycentre sweeps: each column sorted by the mean row of its neighbours
        for c in range(max(col.values()) + 1):
            members = [n for n in order if col[n] == c]
            key = {n: (sum(row[m] for m in producers[n] + consumers[n]) / len(producers[n] + consumers[n])
                       if producers[n] + consumers[n] else row[n], _id_key(n)) for n in members}
            for i, n in enumerate(sorted(members, key=lambda m: key[m])):
                row[n] = float(i)
    return {n: (col[n], int(row[n])) for n in graph}


_COLORS = {"MODEL": "#7c5cbf", "CLIP": "#d4a017", "CONDITIONING": "#c0722c", "GUIDER": "#3a7d44",
           "SAMPLER": "#2e86ab", "SIGMAS": "#1b998b", "NOISE": "#8d8d8d", "LATENT": "#d1495b", "VAE": "#e07a5f",
           "IMAGE": "#3d5a80"}
# output types per class, for the arrows' colours (the test holds the full table, from ComfyUI's source)
_OUTPUTS = {"UNETLoader": ["MODEL"], "ModelSamplingAuraFlow": ["MODEL"], "LoraLoaderModelOnly": ["MODEL"],
            "CLIPLoader": ["CLIP"], "CLIPTextEncode": ["CONDITIONING"], "BasicGuider": ["GUIDER"],
            "KSamplerSelect": ["SAMPLER"], "BasicScheduler": ["SIGMAS"], "ManualSigmas": ["SIGMAS"],
            "SplitSigmas": ["SIGMAS", "SIGMAS"], "RandomNoise": ["NOISE"], "DisableNoise": ["NOISE"],
            "EmptySD3LatentImage": ["LATENT"], "EmptyFlux2LatentImage": ["LATENT"],
            "SamplerCustomAdvanced": ["LATENT", "LATENT"], "VAELoader": ["VAE"], "VAEDecode": ["IMAGE"]}


def _box_lines(node: dict) -> list[str]:
    lines = []
    for name, value in node["inputs"].items():
        if isinstance(value, list):
            continue
        text = f'"{value}"' if isinstance(value, str) else f"{value:g}" if isinstance(value, float) else str(value)
        if len(text) > 44:
            text = text[:41] + '..."'
        lines.append(f"{name}: {text}")
    return lines


def draw_workflow(graph: dict, path: str, title: str | None = None) -> None:
    """Draw ``graph`` to ``path`` (PNG): one box per node (title, class, widget values), one arrow per link
    coloured by its type, columns left to right in topological order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Patch

    pos = layout(graph)
    box_w, col_gap, line_h = 4.2, 0.9, 0.26
    n_links = {n: sum(isinstance(v, list) for v in graph[n]["inputs"].values()) for n in graph}
    heights = {n: max(2 + len(_box_lines(graph[n])), 1 + n_links[n]) * line_h + 0.25 for n in graph}
    columns = max(c for c, _ in pos.values()) + 1
    # rows: stack the boxes of a column top-down with a fixed gap
    top = {}
    for c in range(columns):
        y = 0.0
        for n in sorted((n for n in graph if pos[n][0] == c), key=lambda m: pos[m][1]):
            top[n] = y
            y -= heights[n] + 0.55
    depth = -min(top[n] - heights[n] for n in graph)
    x = {n: pos[n][0] * (box_w + col_gap) for n in graph}
    fig_w, fig_h = columns * (box_w + col_gap) * 0.62, (depth + 1.2) * 0.62
    fig, ax = plt.subplots(figsize=(fig_w, fig_h), dpi=150)
    used = set()
    for src, out, dst, name in links(graph):
        kind = _OUTPUTS.get(graph[src]["class_type"], ["?"] * (out + 1))[out]
        used.add(kind)
        start = (x[src] + box_w, top[src] - heights[src] / 2)
        linked = [k for k, v in graph[dst]["inputs"].items() if isinstance(v, list)]
        end = (x[dst], top[dst] - heights[dst] * (linked.index(name) + 1) / (len(linked) + 1))
        ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=9, lw=1.1,
                                     color=_COLORS.get(kind, "black"), connectionstyle="arc3,rad=0.0",
                                     shrinkA=0, shrinkB=0, zorder=1))
    for n, node in graph.items():
        h = heights[n]
        ax.add_patch(FancyBboxPatch((x[n], top[n] - h), box_w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                    fc="#f7f7f2", ec="#333333", lw=1.0, zorder=2))
        ax.text(x[n] + 0.1, top[n] - 0.08, f"#{n} {node['_meta']['title']}", fontsize=7.5, weight="bold",
                va="top", zorder=3)
        ax.text(x[n] + 0.1, top[n] - 0.08 - line_h, node["class_type"], fontsize=7, style="italic",
                color="#555555", va="top", zorder=3)
        for i, line in enumerate(_box_lines(node)):
            ax.text(x[n] + 0.1, top[n] - 0.08 - (i + 2) * line_h, line, fontsize=6.5, family="monospace",
                    va="top", zorder=3)
    ax.legend(handles=[Patch(color=_COLORS[k], label=k) for k in _COLORS if k in used], loc="lower right",
              fontsize=7, ncol=len(used) // 2 + 1, frameon=False)
    ax.set_xlim(-0.3, columns * (box_w + col_gap) - col_gap + 0.3)
    ax.set_ylim(-depth - 1.0, 0.4)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
