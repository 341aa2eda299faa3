"""Experts views (data path + figures): what each expert takes at token level — its words, digit
classes and topics, the patch positions and real digits of the images it takes, how these changed
between two snapshots — and a layer × expert map of what dominates each expert.

Data: the run's ``token_routing`` group through ``moe_probe.specialization`` (torch-free), read
once per committed version of the group."""

from __future__ import annotations

import functools

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from dashboards import data
from dashboards.cache import Cache
from dashboards.components import MODALITY_COLORS, TEMPLATE, message_figure
from moe_probe import specialization as sp

_routing = Cache("token_routing", entries=8)
STEP_A_COLOR = "rgba(120,120,120,0.55)"
"""Bars of the earlier snapshot (step A) beside the later one's colour."""
TOP_WORDS = 15
TOP_IMAGES = 6


def token_routing(root, run_id) -> tuple[sp.TokenRouting, object]:
    """(TokenRouting, its specialization Dataset), cached while the group commits no rows."""
    store = data.open_store(root, run_id)
    if "token_routing" not in store.groups or data.group_dataset(root, run_id, "token_routing") is None:
        raise data.DataError(f"{run_id}: no token-level routing recorded (token_routing group)")
    n = data.committed(root, run_id).get("token_routing")

    def build():
        tr = sp.TokenRouting.from_store(store)
        return tr, sp.specialization(tr)
    return _routing.get((str(root), run_id), n, build)


def steps(root, run_id) -> list[int]:
    """The snapshot steps with token-level routing."""
    return [int(s) for s in token_routing(root, run_id)[0].steps]


def _row(tr, step) -> int:
    """Row of the token-routing step nearest to ``step`` (the last row for None)."""
    if step is None:
        return len(tr.steps) - 1
    return int(np.argmin(np.abs(tr.steps - int(step))))


def _layer(tr, layer) -> int:
    if str(layer) not in tr.layers:
        raise data.DataError(f"no layer {layer} in token-level routing")
    return tr.layers.index(str(layer))


def _counts(root, run_id, layer, expert, step):
    tr, _ = token_routing(root, run_id)
    s = _row(tr, step)
    return tr, int(tr.steps[s]), sp.expert_counts(tr, s, _layer(tr, layer), int(expert))


# ---------------------------------------------------------------------- map of what dominates
_BANDS = (("#dbe9f6", "#08519c"), ("#dff2d8", "#006d2c"), ("#fde3cc", "#a63603"))


def _band_scale(n: int) -> list:
    """A colour scale of ``n`` bands, light to dark each: z = band + share."""
    scale = []
    for i in range(n):
        lo, hi = _BANDS[i % len(_BANDS)]
        scale += [[i / n, lo], [(i + 1) / n - 1e-6 if i + 1 < n else 1.0, hi]]
    return scale


def _top_label(tr, counts, m: int) -> str:
    kind = tr.modalities[m]
    lab = counts["labels"][m]
    if kind == "text" and len(counts["words"]):
        topics = tr.label_range("topic")
        if len(topics) and lab[list(topics)].sum():
            return "topic " + tr.label_names[topics[0] + int(np.argmax(lab[list(topics)]))]
        return repr(tr.vocab.get(str(int(counts["words"][0])), str(int(counts["words"][0]))))
    if lab.sum():
        return f"digit {tr.label_names[int(np.argmax(lab))]}"
    return kind


def expert_map(root, run_id, step_b=None) -> go.Figure:
    """Layer × expert: the kind of token that dominates each expert (colour band) and how much
    (shade: its share of the expert's probe picks) at step ``step_b``; text: its top label;
    hover: every metric."""
    tr, spec = token_routing(root, run_id)
    s = _row(tr, step_b)
    L, E, M = len(tr.layers), tr.n_experts, len(tr.modalities)
    z = np.full((L, E), np.nan)
    text = np.full((L, E), "", dtype=object)
    hover = np.full((L, E), "", dtype=object)
    row = spec.isel(step=s)
    for li in range(L):
        for e in range(E):
            c = sp.expert_counts(tr, s, li, e)
            total = c["kinds"].sum()
            if not total:
                hover[li, e] = f"layer {tr.layers[li]} expert {e}: takes no probe token"
                continue
            m = int(np.argmax(c["kinds"]))
            share = c["kinds"][m] / total
            z[li, e] = m + min(share, 0.999)
            text[li, e] = _top_label(tr, c, m)
            vals = {v: float(row[v].values[li, e]) for v in
                    ("vocabulary", "domain", "class_vit", "class_vae", "position_vit",
                     "position_vae", "saturation") if v in row}
            hover[li, e] = (f"layer {tr.layers[li]} expert {e}<br>{tr.modalities[m]} "
                            f"{share:.0%} of {int(total)} picks · {text[li, e]}<br>"
                            + "<br>".join(f"{k}: {v:.3f}" for k, v in vals.items()))
    fig = go.Figure(go.Heatmap(
        z=z.astype(np.float32), x=list(range(E)), y=tr.layers, zmin=0, zmax=M,
        colorscale=_band_scale(M), text=text, texttemplate="%{text}", textfont=dict(size=9),
        customdata=hover, hovertemplate="%{customdata}<extra></extra>", hoverongaps=False,
        colorbar=dict(thickness=12, tickvals=[m + 0.5 for m in range(M)],
                      ticktext=tr.modalities, ticklabeloverflow="allow")))
    fig.update_layout(template=TEMPLATE, height=120 + 40 * L, margin=dict(l=55, r=85, t=45, b=45),
                      title=f"{run_id} · what dominates each expert — step {int(tr.steps[s])}",
                      xaxis_title="expert", yaxis_title="layer")
    fig.update_xaxes(dtick=1)
    fig.update_yaxes(type="category")
    return fig


# ---------------------------------------------------------------------- one expert
def _title(run_id, layer, expert, a, b, what):
    return f"{run_id} · layer {layer} expert {expert} — {what}, step {a} vs {b}"


def expert_words(root, run_id, layer, expert, step_a, step_b) -> go.Figure:
    """The words the expert takes most at ``step_b`` (decoded with the run's tokenizer), with
    how often it took them at ``step_a``."""
    tr, b, cb = _counts(root, run_id, layer, expert, step_b)
    _, a, ca = _counts(root, run_id, layer, expert, step_a)
    ids = list(cb["words"][:TOP_WORDS])
    ids += [i for i in ca["words"][:TOP_WORDS] if i not in ids][:max(0, TOP_WORDS - len(ids))]
    if not ids:
        return message_figure("takes no text token at either step",
                              _title(run_id, layer, expert, a, b, "top words"))
    words = [tr.vocab.get(str(int(i)), f"#{int(i)}") for i in ids]

    def counts(c):
        d = dict(zip(c["words"].tolist(), c["word_counts"].tolist()))
        return [d.get(int(i), 0) for i in ids]
    fig = go.Figure([go.Bar(y=words, x=counts(ca), orientation="h", name=f"step {a}",
                            marker_color=STEP_A_COLOR),
                     go.Bar(y=words, x=counts(cb), orientation="h", name=f"step {b}",
                            marker_color=MODALITY_COLORS["text"])])
    fig.update_layout(template=TEMPLATE, height=max(300, 22 * len(ids) + 110), barmode="group",
                      margin=dict(l=120, r=20, t=45, b=45),
                      title=_title(run_id, layer, expert, a, b, "top words"),
                      xaxis_title="tokens", legend=dict(orientation="h", y=1.0, yanchor="bottom",
                                                        x=1, xanchor="right"))
    fig.update_yaxes(autorange="reversed", type="category")
    return fig


def expert_labels(root, run_id, layer, expert, step_a, step_b) -> go.Figure:
    """Digit classes (vit and vae tokens) and topics (text tokens) the expert takes, at both
    steps."""
    tr, b, cb = _counts(root, run_id, layer, expert, step_b)
    _, a, ca = _counts(root, run_id, layer, expert, step_a)
    digits, topics = tr.label_range("digit"), tr.label_range("topic")
    fig = make_subplots(rows=1, cols=2, column_widths=[0.6, 0.4], horizontal_spacing=0.1,
                        subplot_titles=("digit classes (image tokens)", "topics (text tokens)"))
    for m, kind in enumerate(tr.modalities):
        for c, step, light in ((ca, a, True), (cb, b, False)):
            color = MODALITY_COLORS.get(kind, "#777")
            style = dict(marker_color=color, opacity=0.45 if light else 1.0,
                         name=f"{kind} · step {step}")
            if kind != "text" and len(digits):
                fig.add_trace(go.Bar(x=[tr.label_names[i] for i in digits],
                                     y=c["labels"][m][list(digits)], **style), row=1, col=1)
            if kind == "text" and len(topics):
                fig.add_trace(go.Bar(x=[tr.label_names[i] for i in topics],
                                     y=c["labels"][m][list(topics)], **style), row=1, col=2)
    fig.update_layout(template=TEMPLATE, height=360, barmode="group",
                      margin=dict(l=50, r=20, t=75, b=90),
                      title=_title(run_id, layer, expert, a, b, "labels"),
                      legend=dict(orientation="h", y=-0.3, yanchor="top"))
    fig.update_xaxes(type="category")
    return fig


def _pixels(patch_counts, grid, patch_size) -> np.ndarray:
    """Patch counts as the image's pixels (each pixel shows its patch)."""
    g = np.asarray(patch_counts, dtype=np.float64).reshape(grid)
    return np.kron(g, np.ones((patch_size, patch_size)))


def expert_patches(root, run_id, layer, expert, step_a, step_b) -> go.Figure:
    """8×8 heat maps of the patch positions the expert takes, per image kind, at both steps
    (each pixel shows the tokens of its patch)."""
    tr, b, cb = _counts(root, run_id, layer, expert, step_b)
    _, a, ca = _counts(root, run_id, layer, expert, step_a)
    kinds = [m for m, k in enumerate(tr.modalities) if k in sp.IMAGE_KINDS]
    if not kinds or not int(np.prod(tr.patch_grid)):
        return message_figure("no image tokens in the probe set",
                              _title(run_id, layer, expert, a, b, "patch positions"))
    size = int(_legend(root, run_id).get("patch_size", 1))
    panels = [(m, c, step) for m in kinds for c, step in ((ca, a), (cb, b))]
    fig = make_subplots(rows=1, cols=len(panels), horizontal_spacing=0.04,
                        subplot_titles=[f"{tr.modalities[m]} · step {step}" for m, _, step in panels])
    zmax = max(1, max(int(c["patches"][m].max()) for m, c, _ in panels))
    for i, (m, c, _) in enumerate(panels, start=1):
        fig.add_trace(go.Heatmap(z=_pixels(c["patches"][m], tr.patch_grid, size).astype(np.float32),
                                 zmin=0, zmax=zmax, colorscale="Magma", showscale=(i == len(panels)),
                                 colorbar=dict(thickness=10, ticklabeloverflow="allow"),
                                 hovertemplate="row %{y} col %{x}: %{z} tokens<extra></extra>"),
                      row=1, col=i)
    fig.update_layout(template=TEMPLATE, height=300, margin=dict(l=30, r=70, t=75, b=30),
                      title=_title(run_id, layer, expert, a, b, "patch positions"))
    fig.update_yaxes(autorange="reversed", showticklabels=False, scaleanchor=None)
    fig.update_xaxes(showticklabels=False)
    return fig


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target


def _legend(root, run_id) -> dict:
    return data.open_store(root, run_id).attrs.get(sp.ATTR, {})


def expert_images(root, run_id, layer, expert, step_a, step_b) -> go.Figure:
    """The real digits (sklearn's ``load_digits``) whose patches the expert takes most, at both
    steps (top row ``step_b``), titled with class, kind and how many of its patches it takes."""
    tr, b, cb = _counts(root, run_id, layer, expert, step_b)
    _, a, ca = _counts(root, run_id, layer, expert, step_a)
    if not len(cb["images"]) and not len(ca["images"]):
        return message_figure("takes no image token at either step",
                              _title(run_id, layer, expert, a, b, "images"))
    images, target = _digits()
    rows = [(cb, b), (ca, a)]
    titles = []
    for c, step in rows:
        for j in range(TOP_IMAGES):
            if j < len(c["images"]):
                i, m, n = int(c["images"][j]), int(c["image_kinds"][j]), int(c["image_counts"][j])
                titles.append(f"{target[i]} · {tr.modalities[m]} {n}/{int(np.prod(tr.patch_grid))}")
            else:
                titles.append("")
    fig = make_subplots(rows=2, cols=TOP_IMAGES, subplot_titles=titles, vertical_spacing=0.12,
                        horizontal_spacing=0.02)
    for r, (c, step) in enumerate(rows, start=1):
        for j in range(min(TOP_IMAGES, len(c["images"]))):
            fig.add_trace(go.Heatmap(z=images[int(c["images"][j])].astype(np.float32),
                                     colorscale="Greys", showscale=False, zmin=0, zmax=16,
                                     hovertemplate=f"step {step}<extra></extra>"),
                          row=r, col=j + 1)
    fig.update_layout(template=TEMPLATE, height=380, margin=dict(l=20, r=20, t=75, b=20),
                      title=_title(run_id, layer, expert, a, b,
                                   f"digits it takes most (top row step {b})"))
    fig.update_yaxes(autorange="reversed", showticklabels=False)
    fig.update_xaxes(showticklabels=False)
    fig.update_annotations(font_size=10)
    return fig
