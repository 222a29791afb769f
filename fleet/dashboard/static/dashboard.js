// EdgeFleet dashboard: live regions and buttons. No framework, nothing fetched elsewhere.
//
// Live: every data-poll-ms the page asks its own URL with ?_live=1 for the HTML of its
// live regions ([data-live=name]) and swaps the ones that changed. A region holding the
// focus is left alone until the focus moves. 401 means the token is gone: go to sign-in.
//
// Buttons: [data-action] POSTs JSON {reason} to the dashboard, which calls the REST API
// with the operator's own token; the API's answer (or its error message) is shown in #flash.
(function () {
  "use strict";
  var body = document.body;
  var pollMs = parseInt(body.getAttribute("data-poll-ms") || "0", 10);
  var base = body.getAttribute("data-base") || "";
  var statusEl = document.getElementById("live-status");
  var flashEl = document.getElementById("flash");
  var last = {};
  var busy = false;
  var failures = 0;

  function setStatus(text, bad) {
    if (!statusEl) return;
    statusEl.textContent = text;
    statusEl.classList.toggle("stale", !!bad);
  }

  function flash(kind, text) {
    if (!flashEl) return;
    flashEl.hidden = false;
    flashEl.className = "flash flash-" + kind;
    flashEl.setAttribute("role", kind === "error" ? "alert" : "status");
    flashEl.textContent = text;
  }

  function goSignIn(answer) {
    var next = location.pathname + location.search;
    var url = (answer && answer.login) || (base + "/login?next=" + encodeURIComponent(next));
    location.assign(url);
  }

  function liveUrl() {
    var url = new URL(location.href);
    url.searchParams.set("_live", "1");
    return url.toString();
  }

  function swap(regions) {
    Object.keys(regions).forEach(function (name) {
      var html = regions[name];
      var el = document.querySelector('[data-live="' + name + '"]');
      if (!el || last[name] === html) return;
      var active = document.activeElement;
      if (active && active !== body && el.contains(active)) return;
      // keep open <details> open across the swap (by their position in the region)
      var open = [];
      el.querySelectorAll("details").forEach(function (d, i) { if (d.open) open.push(i); });
      el.innerHTML = html;
      var details = el.querySelectorAll("details");
      open.forEach(function (i) { if (details[i]) details[i].open = true; });
      last[name] = html;
    });
  }

  function refresh() {
    if (busy || document.hidden) return Promise.resolve();
    busy = true;
    return fetch(liveUrl(), {
      headers: { Accept: "application/json" },
      credentials: "same-origin",
      cache: "no-store",
    })
      .then(function (r) {
        if (r.status === 401) {
          return r.json().catch(function () { return {}; }).then(goSignIn);
        }
        if (r.status === 404) {
          location.reload(); // the object is gone: the page says so
          return;
        }
        if (!r.ok) throw new Error("HTTP " + r.status);
        return r.json().then(function (data) {
          swap(data.regions || {});
          failures = 0;
          var at = new Date(data.at || Date.now());
          body.setAttribute("data-updated", at.toISOString());
          setStatus("live · updated " + at.toLocaleTimeString(), false);
        });
      })
      .catch(function (err) {
        failures += 1;
        setStatus("not updating (" + err.message + "); retrying", true);
      })
      .finally(function () { busy = false; });
  }

  function act(button) {
    var question = button.getAttribute("data-confirm");
    if (question && !window.confirm(question)) return;
    var scope = button.closest("[data-action-scope]");
    var reasonEl = scope && scope.querySelector('input[name="reason"]');
    var payload = { reason: reasonEl ? reasonEl.value : "" };
    var label = button.textContent.trim();
    button.disabled = true;
    flash("info", label + "…");
    fetch(button.getAttribute("data-action"), {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-EdgeFleet-Dashboard": "1" },
      body: JSON.stringify(payload),
    })
      .then(function (r) {
        return r.json().catch(function () { return {}; }).then(function (answer) {
          if (r.status === 401) { goSignIn(answer); return; }
          if (!r.ok) {
            flash("error", label + " failed: " + (answer.detail || r.statusText) + " (HTTP " + r.status + ")");
            return;
          }
          flash("ok", button.getAttribute("data-done") || (label + " done"));
          if (reasonEl) reasonEl.value = "";
        });
      })
      .catch(function (err) { flash("error", label + " failed: " + err.message); })
      .finally(function () {
        button.disabled = false;
        button.blur();
        refresh();
      });
  }

  document.addEventListener("click", function (ev) {
    var button = ev.target.closest ? ev.target.closest("button[data-action]") : null;
    if (!button) return;
    ev.preventDefault();
    act(button);
  });

  if (pollMs > 0) {
    window.setInterval(refresh, pollMs);
    document.addEventListener("visibilitychange", function () { if (!document.hidden) refresh(); });
  }
})();
