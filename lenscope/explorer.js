// The front end of lenscope.explore(): controls, token chips, heatmaps drawn as
// grids of elements (each cell carries data-layer, data-pos and data-score), the
// clicked cell's top-k and lens trajectory, the run history and a comparison.
// Every computation happens in the kernel (lenscope/explorer.py); this file only
// draws traits and sets the ones a user changes.

const KINDS = ["resid_pre", "resid_mid", "resid_post", "mlp_out", "attn_out"];

function el(tag, attrs = {}, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function mix(hex, t) {
  // White (t = 0) to the kind's colour (t = 1).
  const n = parseInt(hex.slice(1), 16);
  const rgb = [(n >> 16) & 255, (n >> 8) & 255, n & 255];
  const c = rgb.map((v) => Math.round(255 + (v - 255) * t));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

function cellColour(map, value) {
  if (value === null || value === undefined) return "#eee";
  const span = map.zmax - map.zmin || 1;
  if (map.diverging) {
    const t = Math.max(-1, Math.min(1, value / map.zmax));
    return t >= 0 ? mix("#b2182b", t) : mix("#2166ac", -t);
  }
  return mix(map.colour, Math.max(0, Math.min(1, (value - map.zmin) / span)));
}

function fmt(value) {
  if (value === null || value === undefined) return "–";
  return Math.abs(value) >= 0.01 || value === 0 ? value.toFixed(3) : value.toExponential(2);
}

function link(grid, layer, pos, on) {
  // Linked hover: the same (layer, pos) cell is outlined in the other heatmaps beside this one.
  const maps = grid.closest(".ls-maps");
  if (!maps) return;
  for (const other of maps.querySelectorAll(".ls-grid")) {
    if (other === grid) continue;
    const twin = other.querySelector(`.ls-cell[data-layer="${layer}"][data-pos="${pos}"]`);
    if (twin) twin.classList.toggle("ls-linked", on);
  }
}

function heatmap(model, map, clickable) {
  const rows = map.scores.length;
  const cols = map.columns.length;
  const grid = el("div", {
    class: "ls-grid" + (map.estimate ? " ls-estimate" : "") + (map.partial ? " ls-partial" : ""),
    "data-kind": map.kind,
  });
  grid.style.gridTemplateColumns = `3em repeat(${cols}, minmax(1.6em, 1fr))`;
  // Layer 0 at the bottom, as ROME draws it.
  for (let layer = rows - 1; layer >= 0; layer--) {
    grid.append(el("div", { class: "ls-layer", text: String(layer) }));
    for (let pos = 0; pos < cols; pos++) {
      const value = map.scores[layer][pos];
      // A streaming kind: a cell still to come shows its estimate, faded.
      const guess = value === null && map.estimate_scores ? map.estimate_scores[layer][pos] : null;
      const pending = map.partial && value === null;
      const cell = el("div", {
        class: "ls-cell" + (pending ? " ls-pending" : ""),
        "data-layer": String(layer),
        "data-pos": String(pos),
        "data-score": value === null ? "" : String(value),
        title:
          `layer ${layer}, ${map.columns[pos]}: ` +
          (pending ? `estimate ${fmt(guess)}, exact value to come` : fmt(value)),
      });
      cell.style.background = cellColour(map, pending ? guess : value);
      cell.addEventListener("mouseenter", () => link(grid, layer, pos, true));
      cell.addEventListener("mouseleave", () => link(grid, layer, pos, false));
      if (clickable) {
        cell.addEventListener("click", () => {
          model.set("cell", { run: map.run, kind: map.kind, layer, pos });
          model.save_changes();
        });
      }
      grid.append(cell);
    }
  }
  grid.append(el("div"));
  map.columns.forEach((label, pos) => {
    const inSubject = map.subject && pos >= map.subject[0] && pos < map.subject[1];
    grid.append(el("div", { class: "ls-col" + (inSubject ? " ls-subject" : ""), text: label }));
  });
  const caption =
    map.clean === undefined
      ? ""
      : `${map.metric} of ${JSON.stringify(map.answer)}: clean ${fmt(map.clean)}, ` +
        `corrupted ${fmt(map.corrupted)}; window ${map.window}; ` +
        `colour ${fmt(map.zmin)} to ${fmt(map.zmax)}`;
  return el("div", { class: "ls-panel" }, [
    el("div", { class: "ls-title", text: map.title }),
    grid,
    el("div", { class: "ls-caption", text: caption }),
  ]);
}

function onEnter(input, commit) {
  // A text box commits on Enter and when it loses focus (the "change" event).
  input.addEventListener("change", commit);
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter") {
      event.preventDefault();
      commit();
    }
  });
}

function render({ model, el: root }) {
  root.classList.add("lenscope-explorer");
  // Keys typed in the widget are the widget's: JupyterLab's notebook shortcuts (Enter, a, b,
  // d d, ...) must not act on them.
  root.dataset.lmSuppressShortcuts = "true";
  root.addEventListener("keydown", (event) => event.stopPropagation());
  const set = (name, value) => {
    model.set(name, value);
    model.save_changes();
  };
  const send = (content) => model.send(content);
  // A box being edited (empty, or "-") holds no number yet: nothing is sent.
  const setNumber = (name, value) => Number.isFinite(value) && set(name, value);

  // Prompt, tokens, answer.
  const prompt = el("input", { class: "ls-prompt", type: "text", placeholder: "prompt (Enter)" });
  onEnter(prompt, () => set("prompt", prompt.value));
  const chips = el("div", { class: "ls-chips" });
  const note = el("div", { class: "ls-note" });
  const answer = el("input", { class: "ls-answer", type: "text", placeholder: "answer (blank: top-1)" });
  onEnter(answer, () => set("answer", answer.value));
  const answerInfo = el("span", { class: "ls-answer-info" });
  const answerWarning = el("div", { class: "ls-warning" });

  // Controls.
  const kindBoxes = KINDS.map((kind) => {
    const box = el("input", { type: "checkbox", value: kind });
    box.addEventListener("change", () =>
      set("kinds", KINDS.filter((k, i) => kindBoxes[i].checked)),
    );
    return box;
  });
  const kinds = el(
    "span",
    { class: "ls-kinds" },
    KINDS.map((kind, i) => el("label", {}, [kindBoxes[i], kind])),
  );
  const window_ = el("input", { type: "number", min: "1", placeholder: "ROME", class: "ls-window" });
  onEnter(window_, () =>
    window_.value === "" ? set("window", null) : setNumber("window", parseInt(window_.value, 10)),
  );
  const corruption = el("select", { class: "ls-corruption" }, [
    el("option", { value: "noise", text: "noise" }),
    el("option", { value: "counterfactual", text: "counterfactual (STR)" }),
  ]);
  corruption.addEventListener("change", () => set("corruption", corruption.value));
  const noise = el("input", { type: "number", step: "0.5", min: "0", class: "ls-noise" });
  onEnter(noise, () => setNumber("noise_multiplier", parseFloat(noise.value)));
  const samples = el("input", { type: "number", min: "1", class: "ls-samples" });
  onEnter(samples, () => setNumber("samples", parseInt(samples.value, 10)));
  const counterfactual = el("input", { type: "text", class: "ls-counterfactual", placeholder: "counterfactual prompt" });
  onEnter(counterfactual, () => set("counterfactual", counterfactual.value));
  const direction = el("select", { class: "ls-direction" }, [
    el("option", { value: "denoise", text: "denoise" }),
    el("option", { value: "noise", text: "noise" }),
  ]);
  direction.addEventListener("change", () => set("direction", direction.value));
  const metric = el("select", { class: "ls-metric" }, [
    el("option", { value: "", text: "default metric" }),
    ...["prob", "log_prob", "logit_diff", "normalized_logit_diff", "normalized_prob", "kl_div"].map(
      (m) => el("option", { value: m, text: m }),
    ),
  ]);
  metric.addEventListener("change", () => set("metric", metric.value));
  const lens = el("input", { type: "checkbox", class: "ls-lens-on" });
  lens.addEventListener("change", () => set("lens", lens.checked));
  const preview = el("input", { type: "checkbox", class: "ls-preview-on" });
  preview.addEventListener("change", () => set("preview", preview.checked));
  const runButton = el("button", { class: "ls-run", text: "Run", onclick: () => send({ action: "run" }) });
  const cancelButton = el("button", { class: "ls-cancel", text: "Cancel", onclick: () => send({ action: "cancel" }) });
  // Export the current view (the comparison if one is shown, else the run) from the kernel.
  const exportName = el("input", { type: "text", class: "ls-export-name", value: "explorer-view" });
  const exportAs = (suffix) => send({ action: "export", path: `${exportName.value || "explorer-view"}${suffix}` });
  const exportPng = el("button", { class: "ls-export-png", text: "Export PNG", onclick: () => exportAs(".png") });
  const exportHtml = el("button", { class: "ls-export-html", text: "Export HTML", onclick: () => exportAs(".html") });
  const exported = el("span", { class: "ls-exported" });
  const bar = el("progress", { class: "ls-progress", max: "1", value: "0" });
  const status = el("span", { class: "ls-status" });
  const error = el("div", { class: "ls-error" });

  const maps = el("div", { class: "ls-maps" });
  const cellInfo = el("div", { class: "ls-cell-info" });
  const history = el("div", { class: "ls-history" });
  const comparison = el("div", { class: "ls-comparison" });

  root.append(
    el("div", { class: "ls-row" }, [prompt]),
    chips,
    note,
    el("div", { class: "ls-row" }, [answer, answerInfo]),
    answerWarning,
    el("div", { class: "ls-row" }, [kinds]),
    el("div", { class: "ls-row" }, [
      el("label", {}, ["window ", window_]),
      corruption,
      el("label", {}, ["noise ×σ ", noise]),
      el("label", {}, ["samples ", samples]),
      counterfactual,
      direction,
      metric,
    ]),
    el("div", { class: "ls-row" }, [
      el("label", {}, [preview, " attribution estimates first"]),
      el("label", {}, [lens, " lens view of a clicked cell"]),
    ]),
    el("div", { class: "ls-row" }, [runButton, cancelButton, bar, status]),
    error,
    el("div", { class: "ls-body" }, [maps, cellInfo]),
    history,
    comparison,
    el("div", { class: "ls-row" }, [el("label", {}, ["view ", exportName]), exportPng, exportHtml, exported]),
  );

  // Token chips: click the subject's first token, then shift-click (or click) its last.
  let anchor = null;
  function drawChips() {
    const tokens = model.get("tokens");
    const [start, end] = model.get("subject").length === 2 ? model.get("subject") : [-1, -1];
    chips.replaceChildren(
      ...tokens.map((token, pos) => {
        const chip = el("span", {
          class: "ls-chip" + (pos >= start && pos < end ? " ls-subject" : ""),
          "data-pos": String(pos),
          text: token,
        });
        chip.addEventListener("click", (event) => {
          if (anchor === null || !event.shiftKey) {
            anchor = pos;
            set("subject", [pos, pos + 1]);
          } else {
            set("subject", [Math.min(anchor, pos), Math.max(anchor, pos) + 1]);
          }
        });
        return chip;
      }),
    );
  }

  function drawAnswer() {
    const info = model.get("answer_info");
    answerInfo.textContent =
      info && info.text !== undefined
        ? `${info.top1 ? "top-1 " : ""}${JSON.stringify(info.text)}: p = ${fmt(info.prob)}` +
          (info.tokens > 1 ? ` (first of ${info.tokens} tokens)` : "")
        : "";
    answerWarning.textContent = model.get("answer_warning");
  }

  function drawControls() {
    prompt.value = model.get("prompt");
    answer.value = model.get("answer");
    const chosen = model.get("kinds");
    kindBoxes.forEach((box) => (box.checked = chosen.includes(box.value)));
    window_.value = model.get("window") === null ? "" : String(model.get("window"));
    corruption.value = model.get("corruption");
    noise.value = String(model.get("noise_multiplier"));
    samples.value = String(model.get("samples"));
    counterfactual.value = model.get("counterfactual");
    direction.value = model.get("direction");
    metric.value = model.get("metric");
    lens.checked = model.get("lens");
    preview.checked = model.get("preview");
    const str = model.get("corruption") === "counterfactual";
    counterfactual.style.display = str ? "" : "none";
    noise.parentElement.style.display = str ? "none" : "";
    samples.parentElement.style.display = str ? "none" : "";
  }

  function drawStatus() {
    const state = model.get("status");
    bar.value = model.get("progress");
    status.textContent = `${state} ${model.get("progress_text")}`;
    status.dataset.status = state;
    runButton.disabled = state === "running" || state === "cancelling";
    cancelButton.disabled = !runButton.disabled;
    error.textContent = model.get("error");
    note.textContent = model.get("subject_note");
    exported.textContent = model.get("exported") ? `wrote ${model.get("exported")}` : "";
  }

  function drawMaps() {
    // An attribution estimate or a kind still streaming is drawn, but only a finished
    // kind's cells open.
    maps.replaceChildren(
      ...model.get("heatmaps").map((map) => heatmap(model, map, !map.estimate && !map.partial)),
    );
  }

  function drawCell() {
    const info = model.get("cell_info");
    if (!info || Object.keys(info).length === 0) {
      cellInfo.replaceChildren();
      return;
    }
    if (info.error) {
      cellInfo.replaceChildren(el("div", { class: "ls-error", text: info.error }));
      return;
    }
    const top = el(
      "ol",
      { class: "ls-top" },
      info.top.map(([token, p]) => el("li", { text: `${JSON.stringify(token)} ${fmt(p)}` })),
    );
    const parts = [
      el("div", {
        class: "ls-title",
        text: `run ${info.run}, ${info.kind}, layer ${info.layer}, pos ${info.pos}: ${fmt(info.score)}`,
      }),
      el("div", { text: "restored run's top-k:" }),
      top,
    ];
    if (info.kind && info.kind.startsWith("attn")) {
      if (info.heads) {
        // Each head restored alone (its hook_z, the cell's window): one bar per head.
        const high = Math.max(...info.heads.map((v) => Math.abs(v ?? 0)), 1e-12);
        const rows = info.heads.map((value, head) => {
          const bar = el("span", { class: "ls-head-bar" });
          bar.style.width = `${(8 * Math.abs(value ?? 0)) / high}em`;
          return el("div", { class: "ls-head", "data-head": String(head), "data-score": String(value) }, [
            `head ${head} `,
            bar,
            ` ${fmt(value)}`,
          ]);
        });
        parts.push(el("div", { class: "ls-heads" }, [el("div", { text: "each head restored alone:" }), ...rows]));
      } else if (info.heads_note) {
        parts.push(el("div", { class: "ls-error", text: info.heads_note }));
      } else {
        parts.push(
          el("button", {
            class: "ls-heads-button",
            text: "per-head breakdown",
            onclick: (event) => {
              event.target.disabled = true;
              event.target.textContent = "tracing each head…";
              send({ action: "heads", run: info.run, kind: info.kind, layer: info.layer, pos: info.pos });
            },
          }),
        );
      }
    }
    if (info.lens) {
      const table = el("table", { class: "ls-lens" });
      const runs = ["clean", "corrupted", "restored"];
      table.append(
        el("tr", {}, [el("th", { text: "layer" }), ...runs.map((r) => el("th", { text: `${r} p(answer), top-1` }))]),
      );
      const n = info.lens.clean.answer_prob.length;
      for (let layer = n - 1; layer >= 0; layer--) {
        table.append(
          el("tr", {}, [
            el("td", { text: String(layer) }),
            ...runs.map((r) =>
              el("td", {
                text: `${fmt(info.lens[r].answer_prob[layer])} ${JSON.stringify(info.lens[r].top1[layer])}`,
              }),
            ),
          ]),
        );
      }
      parts.push(el("div", { text: "logit lens at the last position:" }), table);
    } else if (info.lens_note) {
      parts.push(el("div", { class: "ls-note", text: info.lens_note }));
    }
    cellInfo.replaceChildren(...parts);
  }

  let picked = [];
  function drawHistory() {
    const runs = model.get("history");
    if (runs.length === 0) {
      history.replaceChildren();
      return;
    }
    const mode = el("select", { class: "ls-compare-mode" }, [
      el("option", { value: "side", text: "side by side" }),
      el("option", { value: "difference", text: "difference" }),
    ]);
    const compare = el("button", {
      class: "ls-compare",
      text: "Compare the two ticked runs",
      onclick: () => {
        if (picked.length === 2) send({ action: "compare", a: picked[0], b: picked[1], mode: mode.value });
      },
    });
    history.replaceChildren(
      el("div", { class: "ls-title", text: "runs" }),
      ...runs.map((run) => {
        const box = el("input", { type: "checkbox", "data-run": String(run.run) });
        box.checked = picked.includes(run.run);
        box.addEventListener("change", () => {
          picked = picked.filter((r) => r !== run.run);
          if (box.checked) picked = [...picked, run.run].slice(-2);
        });
        return el("label", { class: "ls-run-entry" }, [
          box,
          `run ${run.run}: ${JSON.stringify(run.prompt)}, ${run.kinds.join(", ")}, ${run.corruption}, ` +
            `${run.direction}${run.complete ? "" : " (cancelled)"}, ${run.seconds} s`,
        ]);
      }),
      el("div", {}, [mode, compare]),
    );
  }

  function drawComparison() {
    const view = model.get("comparison");
    if (!view || !view.heatmaps) {
      comparison.replaceChildren();
      return;
    }
    comparison.replaceChildren(
      el("div", { class: "ls-title", text: `runs ${view.runs[0]} and ${view.runs[1]}: ${view.mode}` }),
      el("div", { class: "ls-maps" }, view.heatmaps.map((map) => heatmap(model, map, false))),
    );
  }

  const draws = {
    tokens: drawChips,
    subject: drawChips,
    answer_info: drawAnswer,
    answer_warning: drawAnswer,
    heatmaps: drawMaps,
    cell_info: drawCell,
    history: drawHistory,
    comparison: drawComparison,
  };
  for (const [name, draw] of Object.entries(draws)) model.on(`change:${name}`, draw);
  for (const name of ["status", "progress", "progress_text", "error", "subject_note", "exported"]) {
    model.on(`change:${name}`, drawStatus);
  }
  for (const name of ["prompt", "answer", "kinds", "window", "corruption", "noise_multiplier", "samples", "counterfactual", "direction", "metric", "lens", "preview"]) {
    model.on(`change:${name}`, drawControls);
  }
  drawControls();
  drawChips();
  drawAnswer();
  drawStatus();
  drawMaps();
  drawCell();
  drawHistory();
  drawComparison();
}

export default { render };
