// The web console's script: keeps server-rendered pages live and sends the few writes a page offers.
// Every page is rendered (and escaped) by the server; on news from the event stream this script fetches the same
// page again and swaps its [data-live] sections, so nothing here builds markup from data.
(function () {
  "use strict";

  var POLL_MS = 5000;  // without an event stream (refused, or too many open), pages are refreshed this often
  var LOG_LINES = 200;  // the end of the run's log that the job page shows
  var refreshing = false;
  var refreshAgain = false;
  var refreshTimer = null;
  var chart = null;
  var chosenMetric = null;

  function byId(id) { return document.getElementById(id); }

  function showLiveState(text, state) {
    var element = byId("live-state");
    if (element) {
      element.textContent = text;
      element.dataset.state = state;
    }
  }

  // ---------------------------------------------------------------- refreshing the live sections
  function scheduleRefresh(delay) {
    if (refreshTimer === null) {
      refreshTimer = window.setTimeout(function () { refreshTimer = null; refresh(); }, delay || 250);
    }
  }

  function refresh() {
    if (refreshing) { refreshAgain = true; return; }
    refreshing = true;
    fetch(window.location.href, { headers: { "Accept": "text/html" }, cache: "no-store", credentials: "same-origin" })
      .then(function (response) {
        if (response.redirected && new URL(response.url).pathname.indexOf("/console/login") === 0) {
          window.location.assign(response.url);  // the login ended: log in again, then come back
          return null;
        }
        return response.ok ? response.text() : null;
      })
      .then(function (html) {
        if (html !== null) { swapLiveSections(new DOMParser().parseFromString(html, "text/html")); }
      })
      .catch(function () { /* the next event or poll tries again */ })
      .then(function () {
        refreshing = false;
        if (refreshAgain) { refreshAgain = false; scheduleRefresh(); }
      });
  }

  function swapLiveSections(fresh) {
    document.querySelectorAll("[data-live]").forEach(function (section) {
      var replacement = section.id && fresh.getElementById(section.id);
      if (replacement) { section.replaceWith(document.importNode(replacement, true)); }
    });
    drawChart();
    loadLog();
  }

  function followEvents() {
    var url = document.body.dataset.eventStream;
    if (!url) { return; }
    if (!window.EventSource) { pollInstead(); return; }
    var source = new EventSource(url);
    source.addEventListener("open", function () {
      showLiveState("live", "live");
      scheduleRefresh();  // whatever happened between the page's rendering and the stream's start
    });
    source.addEventListener("job", function () { scheduleRefresh(); });
    source.addEventListener("error", function () {
      if (source.readyState === EventSource.CLOSED) {  // refused (401, 503 ...): it will not reconnect
        pollInstead();
      } else {
        showLiveState("reconnecting…", "reconnecting");
      }
    });
  }

  function pollInstead() {
    showLiveState("refreshing every " + POLL_MS / 1000 + " s", "polling");
    window.setInterval(refresh, POLL_MS);
  }

  // ---------------------------------------------------------------- the job page: log, chart, cancel
  function jobEnded() {
    var head = byId("job-head");
    return !head || head.dataset.ended === "true";
  }

  function loadLog() {
    var element = byId("log-tail");
    if (!element) { return; }
    fetch(element.dataset.logUrl, { headers: { "Accept": "text/plain" }, cache: "no-store", credentials: "same-origin" })
      .then(function (response) {
        if (response.status === 404) { return "no log"; }
        if (!response.ok) { return "the log cannot be read now (" + response.status + ")"; }
        return response.text().then(function (text) {
          var lines = text.split("\n");
          return lines.length > LOG_LINES ? lines.slice(-LOG_LINES).join("\n") : (text || "(empty)");
        });
      })
      .catch(function () { return "the log cannot be read now"; })
      .then(function (text) {
        element.textContent = text;
        element.scrollTop = element.scrollHeight;  // a tail: its newest lines in view
      });
  }

  function drawChart() {
    var data = byId("metrics-data");
    var box = byId("chart-box");
    if (!box) { return; }
    if (!data || !window.Chart) { box.hidden = true; return; }
    var chartData = JSON.parse(data.textContent);
    var choice = byId("metric-choice");
    if (chosenMetric !== null && chartData.series[chosenMetric]) { choice.value = chosenMetric; }
    choice.onchange = function () { chosenMetric = choice.value; drawChart(); };
    var name = choice.value;
    box.hidden = false;
    if (chart) { chart.destroy(); }
    chart = new window.Chart(byId("metrics-chart"), {
      type: "bar",
      data: {
        labels: chartData.labels,
        datasets: [{
          label: name,
          data: chartData.series[name],
          maxBarThickness: 64,
          backgroundColor: chartData.current.map(function (current) { return current ? "#1f6feb" : "#9db7d8"; })
        }]
      },
      options: {
        animation: false,
        responsive: false,
        plugins: { legend: { display: false }, title: { display: true, text: name } },
        scales: { x: { title: { display: true, text: "artifact version" } } }
      }
    });
  }

  function cancelJob(button) {
    if (!window.confirm("Cancel this job? Its run is stopped; its record and history stay.")) { return; }
    button.disabled = true;
    sendForProblem(fetch(button.dataset.cancelUrl, {
      method: "POST", headers: { "Accept": "application/json" }, credentials: "same-origin"
    }), byId("action-result"), function () { refresh(); });
  }

  // ---------------------------------------------------------------- the pipelines page: upload
  function upload(form) {
    var name = form.elements.pipeline_name.value.trim();
    var body = new FormData(form);
    body.delete("pipeline_name");
    ["description", "version_name"].forEach(function (field) {
      if (!body.get(field)) { body.delete(field); }
    });
    var url = form.dataset.uploadUrl.replace("/NAME/", "/" + encodeURIComponent(name) + "/");
    var result = byId("upload-result");
    result.textContent = "uploading…";
    result.className = "";
    sendForProblem(fetch(url, { method: "POST", body: body, credentials: "same-origin" }), result,
      function (answer) {
        result.textContent = answer.result || "uploaded";
        result.className = "done";
        form.reset();
        refresh();
      });
  }

  // ---------------------------------------------------------------- the jobs page: a new job
  function createJob(form) {
    var field = function (name) { return form.elements[name].value.trim(); };
    var data = { feature_group_name: field("feature_group_name"), query_filter: field("query_filter") };
    if (field("epochs")) { data.arguments = { epochs: field("epochs") }; }
    var body = {
      model_id: { modelname: field("modelname"), modelversion: field("modelversion") },
      training_config: {
        description: field("description"),
        dataPipeline: data,
        trainingPipeline: {
          pipeline_name: field("pipeline_name"), pipeline_version: "latest",
          retraining_pipeline_name: field("retraining_pipeline_name"), retraining_pipeline_version: "latest"
        }
      }
    };
    var result = byId("new-job-result");
    result.textContent = "creating…";
    result.className = "";
    sendForProblem(fetch(form.dataset.createUrl, {
      method: "POST", headers: { "Content-Type": "application/json", "Accept": "application/json" },
      body: JSON.stringify(body), credentials: "same-origin"
    }), result, function (job) {
      window.location.assign(form.dataset.jobPage.replace(/\/0$/, "/" + job.id));
    });
  }

  // A write's answer: `done(json)` when it worked, else the ProblemDetails' detail shown in `where`.
  function sendForProblem(sent, where, done) {
    sent.then(function (response) {
      return response.json().catch(function () { return {}; }).then(function (body) {
        if (response.ok) { done(body); return; }
        where.textContent = (body.detail || ("the service answered " + response.status));
        where.className = "problem";
      });
    }).catch(function () {
      where.textContent = "the service could not be reached";
      where.className = "problem";
    });
  }

  document.addEventListener("click", function (event) {
    var button = event.target.closest("[data-cancel-url]");
    if (button) { cancelJob(button); }
  });

  document.addEventListener("submit", function (event) {
    if (event.target.id === "upload-form") {
      event.preventDefault();
      upload(event.target);
    } else if (event.target.id === "new-job-form") {
      event.preventDefault();
      createJob(event.target);
    }
  });

  document.addEventListener("DOMContentLoaded", function () {
    followEvents();
    drawChart();
    loadLog();
    if (byId("log-tail")) {
      // The log grows between events while the run works.
      window.setInterval(function () { if (!jobEnded()) { loadLog(); } }, POLL_MS);
    }
  });
})();
