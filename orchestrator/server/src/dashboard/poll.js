(function () {
  // Live progress: ask for this page's changing part (the server answers once the
  // execution changed, or after 10 s) and swap it in, until the execution ends; then
  // load the whole page once, which adds the DR report.
  function tick() {
    var live = document.getElementById('live');
    var since = live ? live.dataset.updated : '';
    fetch(location.pathname + '?fragment=1&since=' + encodeURIComponent(since), { credentials: 'same-origin' })
      .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
      .then(function (html) {
        var box = document.createElement('div');
        box.innerHTML = html;
        var next = box.querySelector('#live');
        var now = document.getElementById('live');
        if (now && next) { now.replaceWith(next); }
        if (next && next.dataset.ended) { location.reload(); } else { setTimeout(tick, 200); }
      })
      .catch(function () { setTimeout(tick, 3000); });
  }
  setTimeout(tick, 200);
})();
