// The mint form's grant builder: shows spare rows on demand and checks each grant as it is typed
// against the roles and environments the page was rendered with. The server checks again.
"use strict";
(function () {
  const form = document.getElementById("mint");
  if (!form) return;
  const roles = JSON.parse(form.dataset.roles);
  const envs = JSON.parse(form.dataset.envs);
  const maxTtl = Number(form.dataset.maxTtl);
  const units = { s: 1, m: 60, h: 3600, d: 86400, w: 604800 };
  const appPattern = /^[a-z0-9*?][a-z0-9*?-]*$/;

  function seconds(text) {
    const m = /^\s*(\d+)\s*([smhdw]?)\s*$/.exec(text);
    return m ? Number(m[1]) * units[m[2] || "s"] : null;
  }

  function check(i) {
    const role = document.getElementById("role" + i).value;
    const kind = document.getElementById("kind" + i).value;
    const pattern = document.getElementById("pattern" + i).value.trim();
    const hint = document.getElementById("hint" + i);
    let problem = null;
    let grant = null;
    if (role) {
      if (!roles.includes(role)) problem = "role " + role + " is not in the policy";
      else if ((kind === "gateway") !== (role === "token-admin")) problem = "token-admin goes with scope gateway, and only it";
      else if (kind === "env" && !envs.includes(pattern)) problem = "environment must be one of: " + envs.join(", ");
      else if (kind === "app" && !appPattern.test(pattern)) problem = "app name or glob: lowercase letters, digits, -, * and ?";
      grant = kind === "gateway" ? role + "@gateway" : role + "@" + kind + ":" + pattern;
    }
    hint.textContent = problem ? problem : (grant ? "✓ " + grant : "");
    hint.className = "hint " + (problem ? "bad" : "ok");
    document.getElementById("pattern" + i).disabled = kind === "gateway";
    return { problem: problem, grant: problem ? null : grant };
  }

  function checkAll() {
    const rows = form.querySelectorAll(".grant-row");
    const grants = [];
    let bad = false;
    rows.forEach(function (_, i) {
      const r = check(i);
      if (r.problem) bad = true;
      if (r.grant) grants.push(r.grant);
    });
    const ttl = seconds(document.getElementById("ttl").value);
    const ttlHint = document.getElementById("ttl-hint");
    if (ttl === null || ttl <= 0) { ttlHint.textContent = "a duration like 15m, 1h or 30d"; bad = true; }
    else if (ttl > maxTtl) { ttlHint.textContent = "longer than tokens.max_ttl"; bad = true; }
    else ttlHint.textContent = "";
    ttlHint.className = "hint bad";
    if (!grants.length) bad = true;
    document.getElementById("preview").textContent = grants.length ? "Grants: " + grants.join("  ") : "Choose a role and a scope.";
    document.getElementById("do-mint").disabled = bad;
  }

  form.addEventListener("input", checkAll);
  form.addEventListener("change", checkAll);
  document.getElementById("more").addEventListener("click", function () {
    const spare = form.querySelector(".grant-row.spare:not(.shown)");
    if (spare) spare.classList.add("shown");
  });
  checkAll();
})();
