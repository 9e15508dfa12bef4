"""The efficacy lab (issue 13): each paper's claim measured on the toy world's trained model, through the
pack's own nodes in the real host, scored by the world's oracle. Writes bench/FIDELITY.md and its pictures
(bench/fidelity/img/).

    COMFYUI_PATH=/path/to/ComfyUI python bench/fidelity/run.py [--quick] [--only baseline pnd lnr palp]

Each experiment caches its section under bench/out/fidelity/ (gitignored), so parts can be rerun alone
(``--only``) and the report is assembled from every section present. ``--quick``: 8 seeds, small sweeps,
few training steps — a smoke run whose numbers are not the report's (it writes bench/out/FIDELITY.quick.md).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
import types

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

STEPS, CFG, SEED = 25, 5.0, 1          # the world's validated sampling: DDIM 25, CFG 5 (toyworld README)
NOVEL = ["beach", "forest", "snow"]    # contexts the personalized model was not trained in
IMG = HERE / "img"


class Lab:
    def __init__(self, quick: bool):
        from common import load
        load("cpu")
        import torch
        from comfyui_personalize.nodes import inversion, lnr, palp, pnd
        import toylab
        torch.set_num_threads(1)
        self.L = toylab
        self.quick = quick
        self.seeds = 8 if quick else 32
        self.cache = toylab.OUT / ("fidelity-quick" if quick else "fidelity")
        self.cache.mkdir(parents=True, exist_ok=True)
        self.lab = toylab.setup(types.SimpleNamespace(pnd=pnd, lnr=lnr, palp=palp, inversion=inversion))
        self.w = self.lab.world
        self._plain = {}

    def picture(self, name: str, rows) -> str:
        path = (IMG if not self.quick else self.cache) / f"{name}.png"
        self.L.save_grid(path, rows)
        rel = path.relative_to(HERE.parent) if not self.quick else path
        return f"![{name}]({rel})"

    def plain(self, which: str, context: str):
        """Cached plain samples: 'personal' (personalized model, y_p) or 'vanilla' (vanilla model, y_p⁻)."""
        key = (which, context)
        if key not in self._plain:
            y_p, y_c = self.L.prompts(context)
            model, prompt = (self.lab.personalized, y_p) if which == "personal" else (self.lab.vanilla, y_c)
            self._plain[key] = self.L.plain(self.lab, model, prompt, self.seeds, SEED, STEPS, CFG)
        return self._plain[key]

    def metrics(self, by_context: dict) -> dict:
        """Per-sample metric vectors over contexts: identity, cos, context, dog, found, spread, IoU to the vanilla
        model's sample from the same noise (same) and from another seed's noise (other: the layout-blind level)."""
        import torch
        L = self.L
        acc = {}
        for ctx, samples in by_context.items():
            s = L.score(samples, self.w.CONTEXTS.index(ctx))
            v = L.score(self.plain("vanilla", ctx), self.w.CONTEXTS.index(ctx))
            row = {k: s[k] for k in ("identity", "cos", "context", "dog", "found")}
            row["spread"] = L.spread(s)
            row["iou_same"] = L.iou(s["mask"], v["mask"])
            row["iou_other"] = L.iou(s["mask"], v["mask"].roll(1, 0))
            row["area"] = s["area"]
            for k, t in row.items():
                acc.setdefault(k, []).append(t)
        return {k: torch.cat(v) for k, v in acc.items()}

    def table(self, rows: dict, cols=("identity", "cos", "context", "dog", "spread", "iou_same", "iou_other")) -> str:
        heads = {"identity": "identity (colour match)", "cos": "cos to subject colour", "context": "context acc.",
                 "dog": "class 'dog' acc.", "spread": "position spread (px)", "iou_same": "IoU vs vanilla, same noise",
                 "iou_other": "IoU vs vanilla, other seed", "iou_stage1": "IoU vs stage 1", "area": "object area (px)"}
        out = ["| condition | " + " | ".join(heads[c] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for name, m in rows.items():
            out.append(f"| {name} | " + " | ".join(self.L.fmt(m[c]) if c in m else "–" for c in cols) + " |")
        return "\n".join(out)

    def save(self, name: str, md: str, verdicts: list):
        (self.cache / f"{name}.json").write_text(json.dumps({"md": md, "verdicts": verdicts}, indent=1))


def mean(m, k):
    return float(m[k].float().mean())


def verdict(claim: str, ok: bool, numbers: str) -> list:
    return [claim, "reproduced" if ok else "not reproduced", numbers]


# --- 1. the personalized baseline ----------------------------------------------------------------------


def exp_baseline(lab: Lab):
    L = lab.L
    rows = {"vanilla model, y_p⁻ (\"a photo of a dog …\")": lab.metrics({c: lab.plain("vanilla", c) for c in NOVEL}),
            "personalized model, y_p (\"a photo of a sks dog …\")": lab.metrics({c: lab.plain("personal", c) for c in NOVEL}),
            "personalized model, its training context (city)": lab.metrics({"city": lab.plain("personal", "city")})}
    train = L.subject_latents(4)
    pics = [("training latents (city)", train, L.score(train, 3)["mask"])]
    for c in NOVEL:
        pics.append((f"vanilla, {c}", lab.plain("vanilla", c), L.score(lab.plain("vanilla", c), 0)["mask"]))
        pics.append((f"personalized, {c}", lab.plain("personal", c), L.score(lab.plain("personal", c), 0)["mask"]))
    base, van = list(rows.values())[1], list(rows.values())[0]
    ok = mean(base, "context") < 0.5 and mean(base, "identity") > 0.8
    md = f"""## 1. The personalized baseline (DreamBooth-style, overfit on purpose)

The whole toy UNet fine-tuned on 4 latents of the sks dog, all in the city (captions "a photo of a sks dog in the
city" / "a photo of a sks dog", AdamW lr 1e-3, 600 steps, batch 4, no prior preservation) — the recipe of
`toyworld/training/personalize.py`, redone in `toylab.finetune` on the host's own model object and cached in
bench/out/. Sampled with the host's Euler (= DDIM) sampler, `ddim_uniform`, {STEPS} steps, CFG {CFG},
{lab.seeds} seeds per context, one batch per context (mean ± standard error over all samples).

{lab.table(rows)}

{lab.picture("baseline", pics)}

Rows: the 4 training latents, then per novel context the vanilla model's and the personalized model's samples
from the same noise (first 8 seeds; the oracle's object mask outlined in white). The personalized model keeps the
subject's colour and draws the city whatever the prompt says, with less varied positions: the failure all three
papers set out to fix.
"""
    lab.save("baseline", md, [verdict("Baseline overfits: identity high, context of novel prompts lost",
                                      ok, f"identity {L.fmt(base['identity'])}, context {L.fmt(base['context'])} "
                                          f"(vanilla context {L.fmt(van['context'])})")])


# --- 2. Pick-and-Draw ------------------------------------------------------------------------------------


def pnd_setup(lab: Lab):
    """The reference (a training latent), its inversions by the personalized and the vanilla model, and
    ``run(contexts, **pick_and_draw options)`` -> {context: samples} (personalized model unless ``model=``)."""
    L, ll = lab.L, lab.lab
    ref = L.subject_latents(4)[:1]
    inv_p = L.invert(ll, ll.personalized, ref, "a photo of a sks dog", STEPS)
    inv_v = L.invert(ll, ll.vanilla, ref, "a photo of a dog", STEPS)

    def run(contexts, **kw):
        model = kw.pop("model", ll.personalized)
        return {c: L.pick_and_draw(ll, model, c, lab.seeds, SEED, STEPS, CFG, **kw) for c in contexts}
    return ref, inv_p, inv_v, run


def exp_pnd(lab: Lab):
    L, ll = lab.L, lab.lab
    ref, inv_p, inv_v, run = pnd_setup(lab)
    eta = ETA_DEFAULT

    t0 = time.time()
    conds = {
        "personalized (baseline)": {c: lab.plain("personal", c) for c in NOVEL},
        "+ appearance": run(NOVEL, reference=inv_p, layout=False, eta=eta),
        "+ layout": run(NOVEL, reference=inv_p, appearance=False, eta=eta),
        "+ both (P&D)": run(NOVEL, reference=inv_p, eta=eta),
        "vanilla model (y_p⁻)": {c: lab.plain("vanilla", c) for c in NOVEL},
        "vanilla model + P&D appearance (§4.4)": run(NOVEL, model=ll.vanilla, reference=inv_v, layout=False,
                                                     personal=False, eta=eta),
    }
    rows = {k: lab.metrics(v) for k, v in conds.items()}
    main_s = time.time() - t0
    pics = [("reference (inverted)", ref, L.score(ref, 3)["mask"])]
    pics += [(k, v["snow"], L.score(v["snow"], 2)["mask"]) for k, v in conds.items()]

    loc = localisation(lab)
    base, app, lay, both = (rows[k] for k in ("personalized (baseline)", "+ appearance", "+ layout", "+ both (P&D)"))
    van, vpnd = rows["vanilla model (y_p⁻)"], rows["vanilla model + P&D appearance (§4.4)"]
    se = lambda m, k: L.mean_se(m[k])
    verdicts = [
        verdict("P&D: identity not lost on the personalized model (+both vs baseline, cos)",
                se(both, "cos")[0] >= se(base, "cos")[0] - 2 * se(both, "cos")[1] - 0.02,
                f"cos {L.fmt(base['cos'])} → {L.fmt(both['cos'])}; identity {L.fmt(base['identity'])} → "
                f"{L.fmt(both['identity'])}"),
        verdict("P&D: layout toward the vanilla model's (IoU vs vanilla same noise up)",
                se(both, "iou_same")[0] > se(base, "iou_same")[0] + 2 * se(both, "iou_same")[1],
                f"IoU {L.fmt(base['iou_same'])} → {L.fmt(both['iou_same'])} (+layout alone {L.fmt(lay['iou_same'])}; "
                f"layout-blind level {L.fmt(base['iou_other'])})"),
        verdict("P&D: diversity toward the vanilla model's (position spread up; positions scrambled, not the vanilla's)",
                se(both, "spread")[0] > se(base, "spread")[0] + se(both, "spread")[1],
                f"spread {L.fmt(base['spread'])} → {L.fmt(both['spread'])} px (vanilla {L.fmt(van['spread'])})"),
        verdict("P&D: text alignment not down (context accuracy)",
                se(both, "context")[0] >= se(base, "context")[0] - 0.05,
                f"context {L.fmt(base['context'])} → {L.fmt(both['context'])} (vanilla {L.fmt(van['context'])})"),
        verdict("P&D §4.4: vanilla model + appearance guidance takes the reference's identity",
                se(vpnd, "identity")[0] > se(van, "identity")[0] + 2 * se(vpnd, "identity")[1],
                f"identity {L.fmt(van['identity'])} → {L.fmt(vpnd['identity'])}, cos {L.fmt(van['cos'])} → "
                f"{L.fmt(vpnd['cos'])}; context {L.fmt(vpnd['context'])}"),
    ]
    md = f"""## 2. Pick-and-Draw

Nodes: `NullTextInvert` (ddim mode: the palette reads only the pivots, methods.md §1.3) on one training latent of
the sks dog with the model being guided and "a photo of a sks dog" (vanilla: "a photo of a dog");
`UREMDGuidance` (subject word "dog", τ, layers 'auto' = the decoder cross-attention at ½ of the latent, window
[0.2, 0.4)); `LayoutGuidance` (the vanilla model, "a photo of a dog <context>", same noise and σ, all
cross-attention layers, window [0, 0.2)); `PickAndDrawSampler` (η, normalised step) into SamplerCustom; prompt
"a photo of a sks dog <context>", {STEPS} steps `ddim_uniform`, CFG {CFG}, {lab.seeds} seeds × {len(NOVEL)} novel
contexts (beach, forest, snow) per condition, η = {eta}, τ = 0.5, α = β = 1 unless stated. The guided word is the
class word "dog", whose cross-attention the world's training localised (caveat 1). Identity = colour (caveat 2).

{lab.table(rows)}

{lab.picture("pnd", pics)}

Rows (snow, first 8 seeds, oracle mask outlined): the reference, then each condition from the same noise.

### Why the layout term cannot work on this baseline: the fine-tune erased the localisation

P&D reads the *personalized* model's subject maps (§3.1) and assumes they mark the subject. Correlation of the
word's decoder-½ cross-attention (captured by `LayoutGuidance`'s own capture over the whole run, 25 steps, head- and
layer-averaged) with the same sample's final oracle mask, against another seed's mask (the layout-blind level),
{lab.seeds} seeds, snow:

{loc}

The vanilla model's maps follow its object (the world's trained-in grounding, caveat 1); the fully fine-tuned
model's no longer do (no grounding loss in the fine-tune; 600 steps at lr 1e-3 rewrote the attention). The layout
term then reshapes maps that do not carry the object: its loss falls during the window (measured: 1.25 → 0.48 at the
window's last step, decoder ½ layers, η 0.1) while the object lands elsewhere, so IoU to the vanilla sample falls
below the layout-blind level. This is the world's baseline, not the node: on the vanilla model (whose maps localise)
the same nodes move the layout as intended (§4.4 row: IoU to the unguided vanilla sample stays high).

Main comparison {main_s:.0f} s wall.
"""
    lab.save("pnd", md, verdicts)


def localisation(lab: Lab) -> str:
    """Map-vs-own-mask correlation through LayoutGuidance's capture (the pack's own attention capture)."""
    import torch
    import torch.nn.functional as F
    L, ll = lab.L, lab.lab
    y_p, y_c = L.prompts("snow")
    latent = torch.zeros(lab.seeds, 4, 16, 16)
    sigmas = L.schedule(ll.vanilla, STEPS)

    def corr(a, b):
        a, b = a.flatten(1) - a.flatten(1).mean(1, keepdim=True), b.flatten(1) - b.flatten(1).mean(1, keepdim=True)
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + 1e-8)

    out = ["| model, word | corr. with own mask | corr. with another seed's mask |", "|---|---|---|"]
    for label, model, prompt, which in (("vanilla, 'dog'", ll.vanilla, y_c, "vanilla"),
                                        ("personalized, 'dog'", ll.personalized, y_p, "personal")):
        with torch.inference_mode():
            term = ll.nodes.pnd.LayoutGuidance.execute(model, ll.clip, prompt, "dog", ll.encode(prompt), ll.encode(""),
                                                       CFG, L.noise_for(SEED, latent), sigmas, {"samples": latent},
                                                       "decoder cross 1/2", 0.0, 1.0, 1.0, 3, 0.5).args[0]
        maps = torch.stack([torch.stack([F.interpolate(m[:, None].float(), size=(16, 16), mode="bilinear")[:, 0]
                                         for m in step.values()]).mean(0) for step in term.maps]).mean(0)
        mask = L.score(lab.plain(which, "snow"), 2)["mask"].float()
        out.append(f"| {label} | {L.fmt(corr(maps, mask))} | {L.fmt(corr(maps, mask.roll(1, 0)))} |")
    return "\n".join(out)


def exp_pnd_sweep(lab: Lab):
    L, ll = lab.L, lab.lab
    ref, inv_p, inv_v, run = pnd_setup(lab)
    eta = ETA_DEFAULT

    sweep_ctx = ["snow"]
    sweeps = {}
    etas = [0.05, 0.2] if lab.quick else [0.03, 0.1, 0.3, 1.0]
    for e in etas:
        sweeps[f"both, η {e}"] = lab.metrics(run(sweep_ctx, reference=inv_p, eta=e))
    for e in etas:
        sweeps[f"vanilla + appearance, η {e}"] = lab.metrics(run(sweep_ctx, model=ll.vanilla, reference=inv_v, layout=False,
                                                               personal=False, eta=e))
    for tau in ([0.3] if lab.quick else [0.3, 0.5, 0.7]):
        sweeps[f"vanilla + appearance, η 0.3, τ {tau}"] = lab.metrics(
            run(sweep_ctx, model=ll.vanilla, reference=inv_v, layout=False, personal=False, eta=0.3, tau=tau))
    for a, b in ([(1.0, 3.0)] if lab.quick else [(1.0, 0.3), (1.0, 1.0), (1.0, 3.0)]):
        sweeps[f"both, η {eta}, α {a} β {b}"] = lab.metrics(run(sweep_ctx, reference=inv_p, eta=eta, app_weight=a,
                                                                lay_weight=b))
    sweeps = {"personalized (no guidance)": lab.metrics({"snow": lab.plain("personal", "snow")}),
              "vanilla (no guidance)": lab.metrics({"snow": lab.plain("vanilla", "snow")}), **sweeps}
    md = f"""### Pick-and-Draw sweeps: η, τ, α/β (snow, {lab.seeds} seeds each; 'both' = personalized model + both terms)

{lab.table(sweeps)}
"""
    van, app = sweeps["vanilla (no guidance)"], sweeps.get("vanilla + appearance, η 0.3")
    verdicts = [] if app is None else [verdict(
        "P&D §4.4 at η 0.3 (snow sweep): vanilla model + appearance moves the colour toward the reference",
        L.mean_se(app["cos"])[0] > L.mean_se(van["cos"])[0] + 2 * L.mean_se(app["cos"])[1],
        f"cos {L.fmt(van['cos'])} → {L.fmt(app['cos'])} (colour match {L.fmt(app['identity'])}: never reaches the "
        f"subject's colour); context {L.fmt(app['context'])}")]
    lab.save("pnd_sweep", md, verdicts)


ETA_DEFAULT = 0.1      # the node's default when the main table was measured (now 0.3, from the sweep)


# --- 3. Layout-and-Retouch -------------------------------------------------------------------------------


def lnr_stage1(lab: Lab):
    """The reference's inversion and stage 1 for every λ1 (cached on disk: both L&R sections use them)."""
    import torch
    L, ll = lab.L, lab.lab
    ref = L.subject_latents(4)[:1]
    reference = L.invert(ll, ll.personalized, ref, "", STEPS)
    lambda1s = [0, 3] if lab.quick else [0, 3, 5, 10]
    path = lab.cache / "lnr_stage1.pt"
    stage1 = torch.load(path) if path.exists() else {}
    if set(stage1) != set(lambda1s):
        stage1 = {l1: {c: L.step_blend(ll, c, lab.seeds, SEED, STEPS, CFG, l1) for c in NOVEL} for l1 in lambda1s}
        torch.save(stage1, path)
    l1 = 3 if lab.quick else 5
    masks1 = {c: L.score(stage1[l1][c], 0)["mask"] for c in NOVEL}
    return ref, reference, stage1, l1, masks1


def lnr_stage2(lab: Lab, layouts, masks1, reference):
    """``stage2(contexts, **options)``: L&R stage 2 on stage 1's ``layouts``; ``with_iou(metrics, outs)``: the
    metrics plus each output's mask IoU against its stage-1 mask."""
    import torch
    L, ll = lab.L, lab.lab

    def stage2(contexts, **kw):
        return {c: L.retouch(ll, c, layouts[c], reference, STEPS, CFG, masks=masks1[c], **kw) for c in contexts}

    def with_iou(m, outs):
        m["iou_stage1"] = torch.cat([L.iou(L.score(outs[c], 0)["mask"], masks1[c]) for c in outs])
        return m
    return stage2, with_iou


def exp_lnr(lab: Lab):
    L = lab.L
    ref, reference, stage1, l1, masks1 = lnr_stage1(lab)
    rows = {f"stage 1, λ1 {k}" + (" (= personalized baseline)" if k == 0 else ""): lab.metrics(v) for k, v in stage1.items()}

    stage2, with_iou = lnr_stage2(lab, stage1[l1], masks1, reference)

    t0 = time.time()
    s2 = stage2(NOVEL)
    rows[f"stage 1 (λ1 {l1}) + stage 2 (λ2 paper's 10/50, blend from 31/50)"] = with_iou(lab.metrics(s2), s2)
    main_s = time.time() - t0
    pics = [("reference (inverted)", ref, L.score(ref, 3)["mask"])]
    pics += [(f"stage 1, λ1 {k}", v["snow"], masks1["snow"] if k == l1 else L.score(v["snow"], 2)["mask"])
             for k, v in stage1.items()]
    pics += [("stage 1 + 2", s2["snow"], L.score(s2["snow"], 2)["mask"])]

    base = rows["stage 1, λ1 0 (= personalized baseline)"]
    s1 = rows[f"stage 1, λ1 {l1}"]
    full = next(m for k, m in rows.items() if "stage 2" in k)
    se = lambda m, k: L.mean_se(m[k])
    verdicts = [
        verdict(f"L&R stage 1 (λ1 {l1}): the prompt's context restored",
                se(s1, "context")[0] > se(base, "context")[0] + 2 * se(s1, "context")[1],
                f"context {L.fmt(base['context'])} → {L.fmt(s1['context'])}; identity {L.fmt(base['identity'])} → "
                f"{L.fmt(s1['identity'])}"),
        verdict(f"L&R stage 1 (λ1 {l1}): positions as varied as the vanilla model's",
                se(s1, "spread")[0] > se(base, "spread")[0] + 2 * se(s1, "spread")[1],
                f"spread {L.fmt(base['spread'])} → {L.fmt(s1['spread'])} px"),
        verdict(f"L&R stage 1 (λ1 {l1}): the vanilla model's own layout for the same noise",
                se(s1, "iou_same")[0] > se(base, "iou_same")[0] + 2 * se(s1, "iou_same")[1],
                f"IoU vs vanilla {L.fmt(base['iou_same'])} → {L.fmt(s1['iou_same'])} (layout-blind "
                f"{L.fmt(base['iou_other'])})"),
        verdict("L&R stage 2: identity up over stage 1",
                se(full, "cos")[0] > se(s1, "cos")[0] + 2 * se(full, "cos")[1],
                f"cos {L.fmt(s1['cos'])} → {L.fmt(full['cos'])}; identity {L.fmt(s1['identity'])} → {L.fmt(full['identity'])}"),
        verdict("L&R stage 2: the object keeps stage 1's layout (mask IoU ≥ 0.8)",
                se(full, "iou_stage1")[0] >= 0.8, f"IoU vs stage 1 {L.fmt(full['iou_stage1'])}"),
    ]
    md = f"""## 3. Layout-and-Retouch

Stage 1: `StepBlendSampler` (vanilla model with "a photo of a dog <context>" for the first λ1 steps, the
personalized model with "a photo of a sks dog <context>" after; `ddim`, `ddim_uniform`, {STEPS} steps, CFG {CFG};
{lab.seeds} seeds × 3 novel contexts in one batch each). λ1 is counted in steps of {STEPS} (the paper's 5 and 3
are of 50). Stage 2: `NullTextInvert` (ddim mode, prompt "") of the reference (a training latent) and of every
layout, then `MultiSourceAttnSwap` (y_r "a photo of a sks dog", y_p the full prompt, CFG {CFG}, swap and blend
layers 'auto', λ2 and blend start −1 = the paper's 10 and 31 of 50 scaled to {STEPS} steps: 5 and 16). The MASK is
the **oracle's** object mask of each layout (upsampled ×8), standing in for SAM's, which needs a real image; the
node accepts any MASK, and no object words are given, so M = the adaptive mask of that MASK alone.

{lab.table(rows, ("identity", "cos", "context", "dog", "spread", "iou_same", "iou_stage1"))}

{lab.picture("lnr", pics)}

Rows (snow, first 8 seeds): the reference; stage 1 for each λ1; stage 1 + 2 at λ1 = {l1}.

Stage 2 over 3 × {lab.seeds} layouts: {main_s:.0f} s wall.
"""
    lab.save("lnr", md, verdicts)


def exp_lnr_sweep(lab: Lab):
    L, ll = lab.L, lab.lab
    ref, reference, stage1, l1, masks1 = lnr_stage1(lab)

    stage2, with_iou = lnr_stage2(lab, stage1[l1], masks1, reference)

    sweeps = {f"stage 1 only (λ1 {l1})": lab.metrics({"snow": stage1[l1]["snow"]}),
              f"stage 1 + 2, λ2 {round(10 * STEPS / 50)} (the paper's, as in the main table)":
                  with_iou(lab.metrics(o := stage2(["snow"])), o)}
    sweep_ctx = ["snow"]
    for l2 in ([2] if lab.quick else [0, 2, 10]):
        outs = stage2(sweep_ctx, lambda2=l2)
        sweeps[f"λ2 {l2} of {STEPS}"] = with_iou(lab.metrics(outs), outs)
    options = L.swap_options(ll)
    pin_note = ("MultiSourceAttnSwap of this version has no pinned / free-running input: that comparison is skipped "
                "(rerun `--only lnr_sweep` once the node has it)." if not options else "")
    # both source paths set alike: all pinned (MasaCtrl / DreamMatcher) vs all free-running (Algorithm 1 literally)
    for value in (next(iter(options.values())) if options else []):
        outs = stage2(sweep_ctx, **{key: value for key in options})
        sweeps[f"{' and '.join(options)} = {value}"] = with_iou(lab.metrics(outs), outs)
    md = f"""### Layout-and-Retouch sweeps: λ2 and the source paths (snow, {lab.seeds} seeds each, λ1 = {l1}; the paper's
λ2 = 10 of 50 is 5 of {STEPS}, in the main table)

{lab.table(sweeps, ("identity", "cos", "context", "iou_same", "iou_stage1"))}

{pin_note}
"""
    lab.save("lnr_sweep", md, [])


# --- 4. PALP ---------------------------------------------------------------------------------------------


def exp_palp(lab: Lab, SWEEP=False):
    L, ll = lab.L, lab.lab
    steps = 30 if lab.quick else PALP_STEPS
    snow = lab.w.CONTEXTS.index("snow")

    def trained(name, weight, alpha=7.5, beta=1.0):
        t0 = time.time()
        model, clip = L.palp_train(ll, name, steps, weight, alpha, beta, lr=PALP_LR, rank=PALP_RANK)
        enc = L.encoder(clip)
        out = {}
        for c in ("snow", "city"):
            prompt = f"a photo of a embedding:{name} {lab.w.PREP[c]}"
            out[c] = L.sample(model, L.euler(), L.schedule(model, STEPS), enc(prompt), enc(""),
                              __import__("torch").zeros(lab.seeds, 4, 16, 16), SEED, CFG)
        return out, time.time() - t0

    runs = {"LoRA + token (alignment weight 0)": ("palp_w0", 0.0, 7.5, 1.0),
            "PALP (alignment weight 1, α 7.5, β 1)": ("palp_w1", 1.0, 7.5, 1.0)} if not SWEEP else \
        {"PALP (alignment weight 0.3, α 7.5, β 1)": ("palp_w03", 0.3, 7.5, 1.0),
         "PALP (alignment weight 1, α 15, β 7.5)": ("palp_a15", 1.0, 15.0, 7.5)}
    rows, pics, secs = {}, [], {}
    for label, (name, weight, a, b) in runs.items():
        out, secs[label] = trained(name, weight, a, b)
        rows[label + ", target (snow)"] = lab.metrics({"snow": out["snow"]})
        rows[label + ", city"] = lab.metrics({"city": out["city"]})
        pics.append((label[:22], out["snow"], L.score(out["snow"], snow)["mask"]))
    if SWEEP:
        lab.save("palp_sweep", "### PALP sweep: alignment weight and α/β (same training otherwise)\n\n"
                 + lab.table(rows, ("identity", "cos", "context", "dog", "spread", "iou_same")) + "\n\n"
                 + lab.picture("palp_sweep", pics) + "\n", [])
        return
    plain_, palp_ = rows["LoRA + token (alignment weight 0), target (snow)"], rows["PALP (alignment weight 1, α 7.5, β 1), target (snow)"]
    se = lambda m, k: L.mean_se(m[k])
    margin = 0.1
    verdicts = [
        verdict("PALP: target-prompt context accuracy up over plain LoRA + token",
                se(palp_, "context")[0] > se(plain_, "context")[0] + 2 * se(palp_, "context")[1],
                f"context {L.fmt(plain_['context'])} → {L.fmt(palp_['context'])}"),
        verdict(f"PALP: identity within {margin} of plain LoRA + token (cos to subject colour)",
                se(palp_, "cos")[0] >= se(plain_, "cos")[0] - margin,
                f"cos {L.fmt(plain_['cos'])} → {L.fmt(palp_['cos'])}; identity {L.fmt(plain_['identity'])} → "
                f"{L.fmt(palp_['identity'])}"),
    ]
    md = f"""## 4. PALP

`PALPTrainer` on the vanilla model: the 4 city latents of the sks dog as IMAGEs through the exact stand-in VAE
(`toylab.ToyVAE`, 128 px ↔ 16×16 latents), y_P "a photo of a [V]", class word "dog", target y_c "a photo of a dog
in the snow", {steps} steps, batch 4, lr {PALP_LR:g}, LoRA rank {PALP_RANK}, same noise and rescale on, full timestep range, seed 0;
only the alignment weight and α/β differ between rows. Sampled with the node's MODEL and CLIP: "a photo of a
embedding:<name> in the snow" (the target) and "… in the city" (the training context), Euler `ddim_uniform`
{STEPS} steps, CFG {CFG}, {lab.seeds} seeds. The toy CLIP has 0 layers: the learned token changes only its own
position's context vector (README caveat), unlike SD's CLIP where it reaches every later token.

{lab.table(rows, ("identity", "cos", "context", "dog", "spread", "iou_same"))}

{lab.picture("palp", pics)}

Rows: the target prompt (snow) under each training, first 8 seeds. Training + sampling wall time:
{", ".join(f"{k} {v:.0f} s" for k, v in secs.items())}.
"""
    lab.save("palp", md, verdicts)


def exp_palp_sweep(lab: Lab):
    exp_palp(lab, SWEEP=True)


PALP_STEPS, PALP_LR, PALP_RANK = 300, 1e-2, 4
EXPERIMENTS = ["baseline", "pnd", "pnd_sweep", "lnr", "lnr_sweep", "palp", "palp_sweep"]


# --- the report ----------------------------------------------------------------------------------------------

HEADER = """# FIDELITY: the three papers' claims on a model that learned something

Generated by `bench/fidelity/run.py` (issue 13). Every number comes from the pack's own nodes run in the real host
(`execute` of the node classes, as the host tier calls them) on the toy world's trained model
(`shared/toyworld/`: the host's `UNetModel`, 1.19 M parameters, SD1 layout, EPS; a 0-layer host CLIP; 4×16×16
latents; no VAE), scored by the world's oracle. Mean ± standard error over samples; "reproduced" needs the effect
beyond about two standard errors. Pictures: decoded latents rendered through a fixed colour projection of the
world's palette, the oracle's object mask outlined in white, the same seeds in every row.

**Caveats of this world (state them with any number below):**
1. *Localisation is trained in, not emergent*: the class word's cross-attention at the ½-resolution layers was
   trained to match the object (a TokenCompose-style grounding loss). Methods that read attention maps (P&D's
   masks and layout term, L&R's M^c) work here because of that loss.
2. *Identity is colour*: the subject differs from a plain dog by its colour and a checkerboard the fine-tuned
   models do not reproduce, so identity = the object's mean latent colour matched against SUBJECT_COLOR (nearest of
   subject/dog/cat/car colours) and its cosine to it. DINO/CLIP-I are not measurable here.
3. *The world is tiny* (16×16): two random objects overlap at IoU ≈ 0.3, the "IoU vs vanilla, other seed" column.
4. The toy CLIP has no transformer layers: a token's embedding reaches only its own position (PALP's learned token).
5. Stand-ins: no VAE (LATENTs are wired where nodes take them; PALPTrainer gets IMAGEs through an exact stand-in VAE,
   `toylab.ToyVAE`); no SAM (L&R's MASK is the oracle's mask of the layout).
"""


DEFAULTS = """## 5. Defaults set from the sweeps (tooltips say "tuned on the toy world; an untested starting point on real models")

| node input | was | now | evidence (snow, 32 seeds; tables above) |
|---|---|---|---|
| Pick-and-Draw Sampler `eta` | 0.1 | **0.3** | vanilla + appearance: cos to the subject −0.35 (none) → −0.32 (0.1) → −0.22 (0.3) with context 1.00; at 1.0 the context is lost (0.00). On the fine-tuned baseline 0.3 costs some identity (cos 0.89) — its maps do not localise (§2). |
| UREMD `tau` | 0.5 | **0.3** | cos −0.21 (0.3) vs −0.22 (0.5) vs −0.31 (0.7), layout kept slightly better at 0.3 (IoU 0.41 vs 0.35); 0.3 and 0.5 are equal within error. |
| UREMD `weight` α / Layout `weight` β | 1 / 1 | 1 / 1 | each term's step is now scaled by its weight: β 0.3 / 1 / 3 gave cos 1.00 / 0.99 / 0.86 and position spread 1.11 / 1.81 / 3.08 px (η 0.1); no setting improved both, so 1 / 1 is kept, untuned. |
| PALP `alignment_weight` | 1 | 1 | 0.3 and 1 both give context 1.00 on the target and cos −0.26 / −0.28; kept. |
| PALP `alpha` / `beta` | 7.5 / 1 | **15 / 7.5** | at weight 1: context 1.00 both, identity cos −0.28 (7.5/1) vs −0.08 (15/7.5), the best of all PALP runs (plain LoRA + token: −0.16); costs one more UNet pass per step. |

Not tuned here: L&R's λ1/λ2 stay the paper's (the λ2 sweep above shows the trade-off; stage 2 did not meet its own
claim in this world, so no value of it is "tuned"); P&D's windows stay Fig. 8's.

## Why claims did not reproduce

- **P&D layout (IoU to the vanilla sample falls):** the fine-tuned baseline's cross-attention no longer marks its
  object (map-to-own-mask correlation 0.37 vs 0.42 for another seed's mask; vanilla 0.89 vs 0.48). The layout term
  lowers its loss but moves maps, not the object. World/baseline (a full fine-tune without the grounding loss erases
  the trained-in localisation), not the implementation; the paper assumes a personalized model whose maps still
  localise, which a real SD DreamBooth keeps far better than this 1.2 M-parameter model.
- **P&D §4.4 at the old default η 0.1:** the appearance step is too small to change the colour (cos −0.36 → −0.35);
  at η 0.3 it moves (−0.22) without losing the context — a default (untuned in the paper), not the method. It never
  reaches the subject's colour here: colour is fixed by the class word before the appearance window [0.2, 0.4) opens,
  and a window from 0 moved it further but cost the context (probe: cos 0.22, context 0.33, η 0.3, window [0, 0.4)).
- **L&R stage 2 (identity up, IoU ≥ 0.8 with stage 1):** self-attention K/V from the reference carry little colour
  in this UNet (2 heads, 32–64 channels; colour comes from the class word through cross-attention), and the oracle
  mask of a 16×16 layout, used as MASK, is coarse; the retouch moves the object (IoU 0.49; 0.58–0.69 in snow
  for every λ2). λ2 barely matters (snow: cos 0.79–0.86 for λ2 10…0, within two standard errors). Partly world (identity = colour, tiny UNet). Pinning
  the source paths to their inversions (the default) keeps stage 1's layout better than free-running (IoU vs stage 1
  0.66 vs 0.56 in snow) at equal identity (cos 0.82 vs 0.80), which is why pinned stays the default.
- **PALP identity:** LoRA rank 4 on the attention projections + the token, 300 steps, does not learn the subject's
  colour in this world for either training (plain −0.16, PALP −0.08…−0.28 cos, identity 0.00); the margin claim is
  met only at α 15 / β 7.5. With a 0-layer CLIP the token reaches only its own position (caveat 4).
"""


def assemble(cache: pathlib.Path, target: pathlib.Path):
    parts, verdicts, times = [], [], {}
    for name in EXPERIMENTS:
        f = cache / f"{name}.json"
        if f.exists():
            d = json.loads(f.read_text())
            parts.append(d["md"])
            verdicts += d["verdicts"]
            times[name] = d.get("seconds", float("nan"))
    table = ["## Claims (5. defaults and the reasons for each failure at the end)", "",
             "| claim | verdict | numbers |", "|---|---|---|"]
    table += [f"| {c} | **{v}** | {n} |" for c, v, n in verdicts]
    text = HEADER + "\n" + "\n".join(table) + "\n\n" + "\n".join(parts) + "\n" + DEFAULTS
    text += ("\n---\nWall time per part of the last run of each (s, one thread, a 2-core CPU shared with other jobs): "
             + ", ".join(f"{k} {v:.0f}" for k, v in times.items()) + f"; total {sum(times.values()):.0f} s, plus "
             "about 2 min (idle CPU ~40 s) once to fine-tune the cached baseline. `--quick` (8 seeds): about 2-5 min.\n")
    target.write_text(text)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", nargs="+", choices=EXPERIMENTS, default=EXPERIMENTS)
    args = ap.parse_args()
    lab = Lab(args.quick)
    for name in args.only:
        t = time.time()
        globals()[f"exp_{name}"](lab)
        f = lab.cache / f"{name}.json"
        f.write_text(json.dumps({**json.loads(f.read_text()), "seconds": time.time() - t}, indent=1))
        print(f"{name}: {time.time() - t:.0f} s", flush=True)
    target = lab.cache.parent / "FIDELITY.quick.md" if args.quick else HERE.parent / "FIDELITY.md"
    assemble(lab.cache, target)
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
