// The lineage page's keys: j or the right arrow steps to the next event, k or the left
// arrow to the previous one, by following the stepper's links (so the URL keeps the
// selected event, and without this script the links do the same).
(function () {
  "use strict";
  var keys = { j: "step-next", ArrowRight: "step-next", k: "step-previous", ArrowLeft: "step-previous" };
  document.addEventListener("keydown", function (event) {
    if (event.defaultPrevented || event.altKey || event.ctrlKey || event.metaKey || event.shiftKey) {
      return;
    }
    var target = event.target;
    if (target && (target.isContentEditable || /^(INPUT|TEXTAREA|SELECT|BUTTON)$/.test(target.tagName))) {
      return;
    }
    var id = keys[event.key];
    var link = id && document.getElementById(id);
    if (link) {
      event.preventDefault();
      window.location.assign(link.href);
    }
  });
})();
