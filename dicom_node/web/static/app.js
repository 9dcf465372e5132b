// dicom-node dashboard: poll the JSON API; when what it answers changes, fetch this page's main section
// again (X-Fragment: 1) and swap it in.  Action buttons POST with the header the node requires.
(function () {
  "use strict";
  const HEADER = { "X-Requested-With": "dicom-node" };
  const main = document.getElementById("main");
  const stamp = document.getElementById("refreshed");

  function volatile(key) { return key === "uptime_s" || key === "time"; }
  function fingerprint(value) {
    return JSON.stringify(value, (k, v) => (volatile(k) ? undefined : v));
  }

  async function refreshMain(note) {
    const rsp = await fetch(location.href, { headers: { "X-Fragment": "1" }, credentials: "same-origin" });
    if (!rsp.ok) return;
    main.innerHTML = await rsp.text();
    bindActions(main);
    bindThumbs(main);
    if (note) {
      // Keep the outcome of the action that caused this refresh in view.
      const line = main.querySelector(".statusline .action-result");
      if (line) { line.className = "action-result " + note.cls; line.textContent = note.text; }
    }
    if (stamp) stamp.textContent = "updated " + new Date().toLocaleTimeString();
  }

  function startPolling() {
    const url = main && main.dataset.poll;
    const every = main ? parseFloat(main.dataset.refresh || "0") : 0;
    if (!url || !(every > 0)) return;
    let last = null;
    let busy = false;
    let sinceFull = 0;
    setInterval(async () => {
      if (busy || document.hidden) return;
      busy = true;
      try {
        const rsp = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
        if (rsp.status === 401) { location.reload(); return; }
        if (!rsp.ok) return;
        const print = fingerprint(await rsp.json());
        sinceFull += every;
        // Also refresh now and then (ages, readiness) even when nothing moved.
        // The first answer may already differ from what the page was rendered with: refresh once then.
        if (print !== last || sinceFull >= 30) { await refreshMain(); sinceFull = 0; }
        last = print;
      } catch (e) { /* the node restarts: try again next tick */ } finally { busy = false; }
    }, every * 1000);
  }

  function bindActions(root) {
    root.querySelectorAll("button.action[data-action]").forEach((btn) => {
      btn.addEventListener("click", async () => {
        if (btn.dataset.confirm && !window.confirm(btn.dataset.confirm)) return;
        const out = btn.closest(".statusline").querySelector(".action-result");
        btn.disabled = true;
        out.className = "action-result";
        out.textContent = "…";
        try {
          const rsp = await fetch(btn.dataset.action, { method: "POST", headers: HEADER, credentials: "same-origin" });
          const body = await rsp.json().catch(() => ({}));
          out.classList.add(rsp.ok && body.ok !== false ? "ok" : "bad");
          out.textContent = rsp.ok ? (body.message || describe(body)) : (body.detail || rsp.statusText);
          if (rsp.ok && !btn.hasAttribute("data-show-message")) {
            await refreshMain({ cls: out.className.replace("action-result", "").trim(), text: out.textContent });
          }
        } catch (e) {
          out.classList.add("bad");
          out.textContent = String(e);
        } finally { btn.disabled = false; }
      });
    });
  }

  // A thumbnail the node withholds (burned-in patient text possible, file removed): say so in its place.
  function bindThumbs(root) {
    root.querySelectorAll(".thumbs img").forEach((img) => {
      const withheld = async () => {
        const fig = img.closest("figure");
        let why = "image not shown";
        try { why = (await (await fetch(img.src, { credentials: "same-origin" })).json()).detail || why; } catch (e) { /* keep */ }
        fig.classList.add("withheld");
        const note = document.createElement("span");
        note.textContent = why;
        img.closest("a").replaceWith(note);
      };
      if (img.complete && img.naturalWidth === 0) withheld(); else img.addEventListener("error", withheld);
    });
  }

  function describe(body) {
    if (body.requeued !== undefined) {
      const r = body.requeued;
      return typeof r === "number" ? `re-queued ${r} delivery(ies)` :
        `re-queued ${r.deliveries} delivery(ies), ${r.studies} analysis(es)`;
    }
    if (body.state) return "queued for analysis";
    return "done";
  }

  bindActions(document);
  bindThumbs(document);
  startPolling();
})();
