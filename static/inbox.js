/* Keyboard triage for the approval inbox (templates/approvals/inbox.html).
 *
 * j / ArrowDown, k / ArrowUp move through the list; a approves the open item; r puts the
 * cursor in its reason box, where Enter rejects; x ticks it for bulk approval; ? shows
 * the keys. Every action clicks what the page already has, so a keyboard
 * decision is the very POST the button makes (htmx sends it, with the CSRF token from
 * <body hx-headers>). No key fires while a person types in a box.
 *
 * It also keeps the list's selection and the navigation's count in step after htmx
 * swaps the list (it polls every 5 s): the count is the one the list shows. */
(function () {
  "use strict";

  function typing(element) {
    if (!element || element === document.body) return false;
    var tag = element.tagName;
    return tag === "INPUT" || tag === "TEXTAREA" || tag === "SELECT" || element.isContentEditable;
  }

  function rows() {
    return Array.prototype.slice.call(document.querySelectorAll("#inbox-rows tr[data-id]"));
  }

  function openCard() {
    return document.querySelector("#inbox-detail article[data-selected]");
  }

  /* The row of the item open in the detail panel gets the mark. */
  function markSelected() {
    var card = openCard();
    var id = card ? card.getAttribute("data-id") : null;
    rows().forEach(function (row) {
      var selected = row.getAttribute("data-id") === id;
      row.classList.toggle("selected", selected);
      if (selected) row.setAttribute("aria-current", "true");
      else row.removeAttribute("aria-current");
    });
  }

  /* The navigation's count says what the list says (both count the same rule). */
  function syncCount() {
    var list = document.getElementById("inbox-list");
    var count = document.getElementById("inbox-count");
    if (!list || !count) return;
    var total = list.getAttribute("data-total");
    count.textContent = total;
    count.classList.toggle("zero", total === "0");
  }

  /* Whether the open item holds text a person typed: moving away would lose it. */
  function typedInDetail() {
    var card = openCard();
    if (!card) return false;
    var boxes = card.querySelectorAll("input[type=text], input:not([type]), textarea");
    return Array.prototype.some.call(boxes, function (box) {
      return box.value !== box.defaultValue;
    });
  }

  function open(row) {
    if (typedInDetail() && !window.confirm("Leave this item? What you typed is lost.")) return;
    var link = row.querySelector("a.open");
    if (!link) return;
    rows().forEach(function (other) {
      other.classList.toggle("selected", other === row);
    });
    row.scrollIntoView({ block: "nearest" });
    link.click();
  }

  function move(step) {
    var list = rows();
    if (!list.length) return;
    var card = openCard();
    var id = card ? card.getAttribute("data-id") : null;
    var at = list.findIndex(function (row) {
      return row.classList.contains("selected") || row.getAttribute("data-id") === id;
    });
    var next = at < 0 ? 0 : Math.min(Math.max(at + step, 0), list.length - 1);
    if (next !== at) open(list[next]);
  }

  /* The open item's decision form, but only once the item marked in the list is the one
   * open: right after j or k the next item is still on its way, and a or r must not
   * act on the one the person just moved away from. */
  function decideForm() {
    var card = openCard();
    var marked = document.querySelector("#inbox-rows tr.selected");
    if (!card || (marked && marked.getAttribute("data-id") !== card.getAttribute("data-id"))) {
      return null;
    }
    // Swapped in but not yet taken up by htmx (it does so as the swap settles): a click
    // now would post the form without htmx and leave the page.
    if (!card.hasAttribute("data-ready")) return null;
    return card.querySelector("form.decide[hx-post*='/decide/']");
  }

  function approve() {
    var form = decideForm();
    if (!form) return;
    var button = form.querySelector("button[data-key='a']");
    if (button) {
      // A click, as a person's: htmx sends the button's decision with the form.
      button.click();
      return;
    }
    // A question is answered in its box (Enter answers); an unknown outcome has no
    // single "approve": its buttons say what happened.
    var box = form.querySelector("input[name=reason]");
    if (form.querySelector("button[value=answer]") && box) box.focus();
  }

  function reject() {
    var form = decideForm();
    if (!form) return;
    var box = form.querySelector("input[name=reason]");
    if (!box) return;
    form.setAttribute("data-enter", "reject");
    box.focus();
  }

  function tick() {
    var row = document.querySelector("#inbox-rows tr.selected");
    var box = row ? row.querySelector("input[name=ids]") : null;
    if (box) box.checked = !box.checked;
  }

  function toggleKeys(show) {
    var keys = document.getElementById("inbox-keys");
    if (keys) keys.open = show === undefined ? !keys.open : show;
  }

  /* htmx has processed new content (and the whole page at start): its cards are ready. */
  document.addEventListener("htmx:load", function (event) {
    var root = event.target;
    if (root.matches && root.matches("article[data-selected]")) root.setAttribute("data-ready", "");
    if (root.querySelectorAll) {
      root.querySelectorAll("article[data-selected]").forEach(function (card) {
        card.setAttribute("data-ready", "");
      });
    }
  });

  document.addEventListener("keydown", function (event) {
    var target = event.target;
    // After r, Enter in the reason box rejects (for a question, whose box also answers).
    if (event.key === "Enter" && target && target.name === "reason") {
      var form = target.form;
      var button = form && form.getAttribute("data-enter") === "reject"
        ? form.querySelector("button[data-key='r']")
        : null;
      if (button) {
        event.preventDefault();
        button.click();
      }
      return;
    }
    if (event.key === "Escape") {
      toggleKeys(false);
      if (typing(target)) target.blur();
      return;
    }
    if (typing(target) || event.ctrlKey || event.metaKey || event.altKey) return;
    var actions = {
      j: function () { move(1); },
      ArrowDown: function () { move(1); },
      k: function () { move(-1); },
      ArrowUp: function () { move(-1); },
      a: approve,
      r: reject,
      x: tick,
      "?": function () { toggleKeys(); },
    };
    var action = actions[event.key];
    if (!action) return;
    event.preventDefault();
    action();
  });

  // A click anywhere on a row opens it, as its link does.
  document.addEventListener("click", function (event) {
    var row = event.target.closest && event.target.closest("#inbox-rows tr[data-id]");
    if (!row || event.target.closest("a, input, button, label")) return;
    open(row);
  });

  document.addEventListener("htmx:afterSettle", function () {
    markSelected();
    syncCount();
  });
})();
