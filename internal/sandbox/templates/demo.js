// The tally demo app: plain JavaScript, no build step. It talks to tally's
// public API (/v1/...) with an end-user token, exactly as a product's
// frontend would; copy it and point API at your tally.
"use strict";

const API = window.location.origin; // tally's base URL (CORS admits other origins listed in TALLY_CORS_ORIGINS)
const $ = (id) => document.getElementById(id);
const store = window.sessionStorage;

function notice(text, ok) {
  const n = $("notice");
  n.textContent = text;
  n.className = "notice " + (ok ? "ok" : "err");
  n.hidden = !text;
}

function newKey() {
  if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
  return String(Date.now()) + "-" + Math.random().toString(16).slice(2);
}

// call is one request to tally's public API with the user's token.
async function call(method, path, body, extraHeaders) {
  const headers = Object.assign({ "Authorization": "Bearer " + store.getItem("token") }, extraHeaders || {});
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const resp = await fetch(API + path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  let data = null;
  try { data = await resp.json(); } catch (e) { /* no body */ }
  return { status: resp.status, data };
}

function problem(r) {
  if (r.data && (r.data.detail || r.data.title || r.data.error)) return r.data.detail || r.data.title || r.data.error;
  return "HTTP " + r.status;
}

function money(amount, currency) {
  return (amount / 100).toFixed(2) + " " + currency.toUpperCase();
}

async function refresh() {
  const who = store.getItem("customer");
  $("who").textContent = who;
  const bal = await call("GET", "/v1/customers/" + encodeURIComponent(who) + "/balance");
  if (bal.status === 404) {
    $("balance").textContent = "0"; // not a customer yet: the first checkout creates it
  } else if (bal.status === 200) {
    $("balance").textContent = String(bal.data.balance);
  } else {
    notice("Could not read the balance: " + problem(bal), false);
  }
  const body = $("ledger").querySelector("tbody");
  body.textContent = "";
  if (bal.status === 200) {
    const led = await call("GET", "/v1/customers/" + encodeURIComponent(who) + "/credits/transactions?limit=20");
    for (const e of (led.data && led.data.data) || []) {
      const tr = document.createElement("tr");
      for (const v of [new Date(e.created_at).toLocaleString(), e.kind, e.amount > 0 ? "+" + e.amount : String(e.amount), e.balance_after, e.reason]) {
        const td = document.createElement("td");
        td.textContent = v;
        tr.appendChild(td);
      }
      body.appendChild(tr);
    }
  }
}

async function loadPacks() {
  const cat = await call("GET", "/v1/catalog");
  const box = $("packs");
  box.textContent = "";
  if (cat.status !== 200) { box.textContent = "Could not load the catalog: " + problem(cat); return; }
  for (const p of cat.data.credit_packs) {
    const b = document.createElement("button");
    b.textContent = "Buy " + p.name + ": " + p.credits + " credits for " + money(p.amount, p.currency);
    b.dataset.pack = p.id;
    b.style.margin = "0 8px 8px 0";
    b.addEventListener("click", () => buy(p));
    box.appendChild(b);
  }
}

// buy starts a Checkout Session for the signed-in user and goes to its
// hosted page; Stripe (here the sandbox) sends the browser back afterwards.
async function buy(pack) {
  const back = API + "/sandbox/demo";
  const r = await call("POST", "/v1/checkout-sessions", {
    customer_id: store.getItem("customer"), item: pack.id, quantity: 1,
    success_url: back + "?checkout=success", cancel_url: back + "?checkout=cancel",
  }, { "Idempotency-Key": newKey() });
  if (r.status !== 201) { notice("Checkout refused: " + problem(r), false); return; }
  store.setItem("pending_payment", r.data.payment_id);
  store.setItem("balance_before", $("balance").textContent);
  window.location.assign(r.data.url);
}

// afterCheckout waits for the payment the user just made to be confirmed
// by Stripe's webhook (tally credits on payment_intent.succeeded, not on
// the redirect), then shows the new balance.
async function afterCheckout(result) {
  const payment = store.getItem("pending_payment");
  history.replaceState(null, "", window.location.pathname);
  if (result === "cancel") { notice("Checkout canceled: nothing was charged.", false); return; }
  if (!payment) return;
  notice("Payment made: waiting for Stripe's confirmation…", true);
  for (let i = 0; i < 100; i++) {
    const p = await call("GET", "/v1/payments/" + encodeURIComponent(payment));
    if (p.status === 200 && p.data.status === "succeeded") {
      store.removeItem("pending_payment");
      notice("Payment succeeded: +" + p.data.credits + " credits.", true);
      await refresh();
      return;
    }
    if (p.status === 200 && p.data.status === "failed") {
      notice("Payment failed: " + (p.data.failure_reason || "declined"), false);
      return;
    }
    await new Promise((res) => setTimeout(res, 200));
  }
  notice("The payment is not confirmed yet: reload in a moment.", false);
}

async function spend(amount) {
  // The spend goes through the product's backend (here the sandbox's demo
  // backend), which holds the service key: tally lets only services spend.
  const resp = await fetch(API + "/sandbox/demo/api/spend", {
    method: "POST",
    headers: { "Authorization": "Bearer " + store.getItem("token"), "Content-Type": "application/json", "Idempotency-Key": newKey() },
    body: JSON.stringify({ amount: amount }),
  });
  let data = null;
  try { data = await resp.json(); } catch (e) { /* none */ }
  if (resp.status === 200) {
    notice("Spent " + amount + " credits.", true);
  } else if (resp.status === 402) {
    notice("Not enough credits: the balance is " + (data && data.balance !== undefined ? data.balance : "too low") + ".", false);
  } else {
    notice("Spend refused: " + problem({ status: resp.status, data }), false);
  }
  await refresh();
}

async function signIn(customer) {
  const resp = await fetch("/sandbox/demo/token", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ customer_id: customer }),
  });
  const data = await resp.json();
  if (resp.status !== 200) { notice(data.error || "sign-in failed", false); return false; }
  store.setItem("token", data.token);
  store.setItem("customer", data.customer_id);
  return true;
}

async function show() {
  $("signin-card").hidden = true;
  $("app").hidden = false;
  await loadPacks();
  await refresh();
}

async function main() {
  const cfg = await (await fetch("/sandbox/demo/config")).json();
  if (!cfg.sign_in) $("signin-note").textContent = "Sign-in needs TALLY_JWT_HS256_SECRET (make run sets one).";
  if (!cfg.spend) { $("spend").disabled = true; $("spend-note").textContent = "Spending needs TALLY_STRIPE_SANDBOX_DEMO_KEY (make run sets one)."; }
  $("signin-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    if (await signIn($("customer-id").value.trim())) await show();
  });
  $("signout").addEventListener("click", () => { store.clear(); window.location.reload(); });
  $("spend-form").addEventListener("submit", (e) => { e.preventDefault(); spend(parseInt($("spend-amount").value, 10)); });
  if (store.getItem("token")) {
    await show();
    const result = new URLSearchParams(window.location.search).get("checkout");
    if (result) await afterCheckout(result);
  }
  document.body.dataset.ready = "true";
}

main();
