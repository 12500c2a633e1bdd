// The live audit view: records arrive as server-sent events (filtered by the server with the
// page's own query); each becomes a row (text only, never HTML) and counts in the chart of
// allowed/denied requests per app over time (bars as narrow as the records kept allow), drawn as plain SVG.
"use strict";
(function () {
  const body = document.getElementById("lines");
  const chart = document.getElementById("chart");
  const live = document.getElementById("live");
  if (!body || !chart) return;
  const ui = chart.dataset.ui;
  const MAX_ROWS = 500;
  const BARS = 30;
  const STEPS = [1, 2, 5, 10, 30, 60, 300, 900, 3600]; // seconds per bar: the finest that shows every record kept
  const KEEP = 20000;
  const seen = []; // [time ms, app, allowed] of the records received, oldest first
  const SVG = "http://www.w3.org/2000/svg";

  function cell(row, text, cls) {
    const td = document.createElement("td");
    td.textContent = text == null ? "" : String(text);
    if (cls) td.className = cls;
    row.appendChild(td);
    return td;
  }

  function addRow(r) {
    const tr = document.createElement("tr");
    tr.className = r.decision === "allow" ? "allow" : "deny";
    cell(tr, (r.ts || "").replace("T", " ").replace("Z", ""));
    cell(tr, r.decision + " " + (r.status == null ? "" : r.status));
    const req = cell(tr, "");
    const code = document.createElement("code");
    code.textContent = (r.method || "") + " " + (r.path || "");
    req.appendChild(code);
    cell(tr, r.action);
    cell(tr, r.app ? r.app + (r.env ? " (" + r.env + ")" : "") : "");
    const tok = cell(tr, "");
    if (r.jti) {
      const a = document.createElement("a");
      a.href = ui + "/tokens/" + encodeURIComponent(r.jti);
      a.textContent = r.token_name || r.jti;
      tok.appendChild(a);
    }
    cell(tr, r.reason, "muted");
    body.insertBefore(tr, body.firstChild);
    while (body.childNodes.length > MAX_ROWS) body.removeChild(body.lastChild);
  }

  function count(r) {
    const t = Date.parse(r.ts || "");
    if (isNaN(t)) return;
    seen.push([t, r.app || "(gateway / no app)", r.decision === "allow"]);
    if (seen.length > KEEP) seen.splice(0, seen.length - KEEP);
  }

  function label(step) {
    return step < 60 ? step + " s" : step < 3600 ? step / 60 + " min" : step / 3600 + " h";
  }

  function el(name, attrs, text) {
    const e = document.createElementNS(SVG, name);
    for (const k in attrs) e.setAttribute(k, String(attrs[k]));
    if (text != null) e.textContent = text;
    return e;
  }

  function draw() {
    const nowMs = Date.now();
    const oldest = seen.length ? Math.min(seen[0][0], nowMs) : nowMs;
    const step = STEPS.find(function (s) { return (nowMs - oldest) / 1000 < s * BARS; }) || STEPS[STEPS.length - 1];
    const now = Math.floor(nowMs / 1000 / step);
    const counts = new Map(); // app -> Map(bar -> {allow, deny})
    seen.forEach(function (x) {
      const bar = Math.floor(x[0] / 1000 / step);
      if (bar <= now - BARS) return;
      if (!counts.has(x[1])) counts.set(x[1], new Map());
      const per = counts.get(x[1]);
      const c = per.get(bar) || { allow: 0, deny: 0, total: 0 };
      c[x[2] ? "allow" : "deny"] += 1;
      c.total += 1;
      per.set(bar, c);
    });
    const apps = Array.from(counts.keys()).map(function (app) {
      let total = 0;
      counts.get(app).forEach(function (c) { total += c.total; });
      return [app, total];
    }).sort(function (a, b) { return b[1] - a[1]; }).slice(0, 8);
    const rowH = 46, left = 190, barW = 22, width = left + BARS * barW + 20;
    const svg = el("svg", { width: width, height: Math.max(apps.length, 1) * rowH + 24, role: "img",
                            "aria-label": "allowed and denied requests per app over time" });
    if (!apps.length) svg.appendChild(el("text", { x: 10, y: 26, fill: "#6b7385" }, "no requests yet"));
    apps.forEach(function (entry, i) {
      const app = entry[0];
      const per = counts.get(app);
      let peak = 1;
      per.forEach(function (c) { peak = Math.max(peak, c.total); });
      const y0 = i * rowH + 8, h = rowH - 14;
      svg.appendChild(el("text", { x: 8, y: y0 + h / 2 + 4, fill: "#1d2330", "font-size": 12 }, app));
      svg.appendChild(el("line", { x1: left, x2: width - 20, y1: y0 + h, y2: y0 + h, stroke: "#dfe3ea" }));
      for (let k = 0; k < BARS; k++) {
        const c = per.get(now - BARS + 1 + k);
        if (!c) continue;
        const x = left + k * barW + 2;
        const ha = Math.round(h * c.allow / peak), hd = Math.round(h * c.deny / peak);
        const g = el("g", {});
        g.appendChild(el("title", {}, app + ": " + c.allow + " allowed, " + c.deny + " denied"));
        if (c.allow) g.appendChild(el("rect", { x: x, y: y0 + h - ha - hd, width: barW - 4, height: ha, fill: "#1f8a4c", class: "bar-allow" }));
        if (c.deny) g.appendChild(el("rect", { x: x, y: y0 + h - hd, width: barW - 4, height: hd, fill: "#c0392b", class: "bar-deny" }));
        svg.appendChild(g);
      }
      svg.appendChild(el("text", { x: 8, y: y0 + h / 2 + 18, fill: "#6b7385", "font-size": 10 }, "highest bar: " + peak));
    });
    svg.appendChild(el("text", { x: left, y: Math.max(apps.length, 1) * rowH + 18, fill: "#6b7385", "font-size": 10 }, label(step * BARS) + " ago · a bar per " + label(step)));
    svg.appendChild(el("text", { x: width - 20, y: Math.max(apps.length, 1) * rowH + 18, fill: "#6b7385", "font-size": 10, "text-anchor": "end" }, "now"));
    chart.replaceChildren(svg);
  }

  const source = new EventSource(location.pathname + "/events" + location.search);
  source.addEventListener("open", function () { live.textContent = "live"; live.className = "live on"; });
  source.addEventListener("records", function (event) {
    const records = JSON.parse(event.data);
    records.forEach(function (r) { addRow(r); count(r); });
    draw();
  });
  source.addEventListener("ended", function () {
    source.close();
    live.textContent = "session ended: sign in again";
    live.className = "live bad";
  });
  source.addEventListener("failed", function (event) {
    source.close();
    live.textContent = JSON.parse(event.data).message;
    live.className = "live bad";
  });
  source.addEventListener("error", function () {
    if (source.readyState === EventSource.CLOSED) { live.textContent = "disconnected"; live.className = "live bad"; }
    else { live.textContent = "reconnecting…"; live.className = "live"; }
  });
  draw();
  setInterval(draw, 5000);
})();
