(function () {
  "use strict";
  var $ = function (id) { return document.getElementById(id); };
  var items = JSON.parse($("items-data").textContent);
  var gallery = $("gallery");
  var pageSize = Number(gallery.dataset.pageSize) || 100;
  var status = $("filter-status"), kind = $("filter-kind"), dup = $("filter-duplicate");
  var search = $("filter-search"), prev = $("page-prev"), next = $("page-next");
  var matches = items, page = 0;

  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function safe(src) {
    return /^(https?:|data:image\/)/i.test(src) || !/^[a-z][a-z0-9+.-]*:/i.test(src) ? src : "";
  }

  // A card shows a picture's thumbnail when there is one and links the full image; a thumbnail that does
  // not load gives way to the full image, and a picture that does not load at all says why.
  function picture(pic, cls, alt) {
    var link = el("a");
    var img = el("img", cls);
    var src = safe(pic.src || ""), small = safe(pic.thumb || "");
    link.dataset.reason = pic.note || "not available";
    img.loading = "lazy";
    img.decoding = "async";
    img.alt = alt;
    img.addEventListener("error", function () {
      if (small && img.getAttribute("src") === small && src) img.src = src;
      else link.classList.add("broken");
    });
    if (src) { link.href = src; link.target = "_blank"; link.rel = "noopener"; img.src = small || src; }
    else link.classList.add("broken");
    link.appendChild(img);
    return link;
  }

  function column(title, cls, sources) {
    var box = el("div", cls);
    box.appendChild(el("h3", null, title));
    var grid = box.appendChild(el("div", "thumbs"));
    sources.forEach(function (node) { grid.appendChild(node); });
    if (!sources.length) grid.appendChild(el("span", "none", "none"));
    return box;
  }

  function card(it) {
    var node = el("article", "card");
    node.dataset.status = it.status;
    node.dataset.kind = it.kind;
    node.dataset.id = it.id;
    var head = node.appendChild(el("div", "card-head"));
    head.appendChild(el("span", "card-id", it.id));
    head.appendChild(el("span", "badge status status-" + it.status, it.status));
    if (it.duplicate) {
      var badge = head.appendChild(el("span", "badge duplicate", "possible duplicate"));
      badge.title = "Resubmitted after an answer was lost: may have been billed twice";
    }
    var pair = node.appendChild(el("div", "pair"));
    pair.appendChild(column("Input", "inputs", it.inputs.map(function (pic, i) {
      return picture(pic, "input", "input " + (i + 1) + " of " + it.id);
    })));
    pair.appendChild(column("Output", "outputs", it.outputs.map(function (out, i) {
      var link = picture(out, "output", "output " + (i + 1) + " of " + it.id);
      if (out.nsfw) link.appendChild(el("span", "badge nsfw", "nsfw"));
      return link;
    })));
    var prompt = node.appendChild(el("p", "prompt", it.prompt));
    prompt.title = "Click to expand";
    prompt.addEventListener("click", function () { prompt.classList.toggle("expanded"); });
    var facts = node.appendChild(el("div", "facts"));
    if (it.size) facts.appendChild(el("span", "size", "size " + it.size));
    if (it.meta) facts.appendChild(el("span", "meta", it.meta));
    facts.appendChild(el("span", "attempts", it.attempts + (it.attempts === 1 ? " submit" : " submits")));
    if (it.inference_ms !== null) {
      facts.appendChild(el("span", "inference", (it.inference_ms / 1000).toFixed(1) + " s"));
    }
    if (it.prediction_id) facts.appendChild(el("span", "prediction", it.prediction_id));
    if (it.status === "failed") {
      var error = node.appendChild(el("div", "error"));
      error.appendChild(el("span", "kind", it.kind || "unknown"));
      if (it.http_status) error.appendChild(el("span", "http-status", "HTTP " + it.http_status + " · "));
      error.appendChild(el("span", "message", it.message));
    }
    return node;
  }

  function wanted(it) {
    var text = search.value.trim().toLowerCase();
    return (!status.value || it.status === status.value)
      && (!kind.value || it.kind === kind.value)
      && (!dup.checked || it.duplicate)
      && (!text || it.id.toLowerCase().indexOf(text) >= 0 || it.prompt.toLowerCase().indexOf(text) >= 0
        || it.meta.toLowerCase().indexOf(text) >= 0);
  }

  function render() {
    var pages = Math.max(1, Math.ceil(matches.length / pageSize));
    page = Math.min(Math.max(page, 0), pages - 1);
    var fragment = document.createDocumentFragment();
    matches.slice(page * pageSize, (page + 1) * pageSize).forEach(function (it) {
      fragment.appendChild(card(it));
    });
    gallery.replaceChildren(fragment);
    $("page-info").textContent = "Page " + (page + 1) + " of " + pages;
    $("match-count").textContent =
      matches.length.toLocaleString() + " of " + items.length.toLocaleString() + " items";
    $("empty").hidden = matches.length > 0;
    prev.disabled = page === 0;
    next.disabled = page >= pages - 1;
  }

  function filter() {
    matches = items.filter(wanted);
    page = 0;
    render();
  }

  function turn(delta) {
    page += delta;
    render();
    $("toolbar").scrollIntoView({ block: "start" });
  }

  [status, kind, dup].forEach(function (control) { control.addEventListener("change", filter); });
  search.addEventListener("input", filter);
  prev.addEventListener("click", function () { turn(-1); });
  next.addEventListener("click", function () { turn(1); });
  document.addEventListener("keydown", function (event) {
    if (event.target instanceof HTMLInputElement || event.target instanceof HTMLSelectElement) return;
    if (event.key === "ArrowLeft" && !prev.disabled) turn(-1);
    if (event.key === "ArrowRight" && !next.disabled) turn(1);
  });
  filter();
})();
