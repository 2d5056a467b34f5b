// prisp console: the same HTTP API as any client. The token lives in this closure only (never in the URL,
// cookies, localStorage or sessionStorage), so closing or reloading the page signs out.
(() => {
  let token = null;
  let me = null;
  const $ = (id) => document.getElementById(id);

  async function api(method, path, body) {
    const response = await fetch(path, {
      method,
      headers: { "Authorization": `Bearer ${token}`, ...(body ? { "Content-Type": "application/json" } : {}) },
      body: body ? JSON.stringify(body) : undefined,
    });
    const data = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(data.detail || `${response.status} ${response.statusText}`);
    return data;
  }

  function show(error) { $("error").textContent = error ? String(error.message || error) : ""; }

  async function signIn(event) {
    event.preventDefault();
    token = $("token").value.trim();
    $("token").value = "";
    try {
      me = await api("GET", "/v1/me");
    } catch (error) { token = null; return show(error); }
    show(null);
    $("signin").hidden = true;
    $("signout").hidden = false;
    $("who").textContent = me.admin ? "admin" : me.user_id;
    if (me.admin) { $("admin").hidden = false; await listUsers(); }
    else { $("user").hidden = false; await loadTasks(); }
  }

  function signOut() {
    token = null; me = null;
    for (const id of ["user", "admin", "signout"]) $(id).hidden = true;
    $("signin").hidden = false;
    $("who").textContent = "";
    for (const id of ["answer-anchor", "answer-personal", "answer-version", "job", "created", "users"]) $(id).textContent = "";
  }

  async function loadTasks() {
    const health = await (await fetch("/healthz")).json();
    $("task").replaceChildren(...health.tasks.map((task) => new Option(task, task)));
  }

  function parseItems(text) {
    const trimmed = text.trim();
    if (trimmed.startsWith("[")) return JSON.parse(trimmed);
    return trimmed.split("\n").filter((line) => line.trim()).map((line) => JSON.parse(line));
  }

  async function personalize() {
    try {
      const items = parseItems($("items").value);
      const job = await api("POST", `/v1/users/${me.user_id}/personalize`, { task: $("task").value, items });
      show(null);
      let state = job;
      while (state.status === "queued" || state.status === "running") {
        $("job").textContent = `job ${job.job_id}: ${state.status} ...`;
        await new Promise((done) => setTimeout(done, 500));
        state = await api("GET", `/v1/jobs/${job.job_id}`);
      }
      $("job").textContent = state.status === "succeeded"
        ? `job ${job.job_id}: succeeded, adapter version ${state.adapter_version}`
        : `job ${job.job_id}: failed: ${state.error}`;
    } catch (error) { show(error); }
  }

  async function ask() {
    const body = { task: $("task").value, input: $("question").value };
    try {
      const [anchor, personal] = await Promise.all([
        api("POST", `/v1/users/${me.user_id}/generate`, { ...body, personal: false }),
        api("POST", `/v1/users/${me.user_id}/generate`, body),
      ]);
      show(null);
      $("answer-anchor").textContent = anchor.output;
      $("answer-personal").textContent = personal.output;
      $("answer-version").textContent = personal.adapter_version ? `(adapter v${personal.adapter_version})` : "(no adapter yet: the anchor)";
    } catch (error) { show(error); }
  }

  async function listUsers() {
    try {
      const { users } = await api("GET", "/v1/users");
      $("users").replaceChildren(...users.map((user) => {
        const row = document.createElement("tr");
        row.dataset.user = user.user_id;
        const adapters = user.adapters.map((a) => `${a.task} v${a.version}, ${(a.size_bytes / 1024).toFixed(0)} KiB`).join("; ") || "none";
        for (const text of [user.user_id, new Date(user.created_at * 1000).toLocaleString(), adapters]) {
          const cell = document.createElement("td"); cell.textContent = text; row.append(cell);
        }
        const cell = document.createElement("td");
        const button = document.createElement("button");
        button.textContent = "Delete";
        button.className = "delete";
        button.onclick = async () => {
          if (!confirm(`Delete ${user.user_id} and all their adapters?`)) return;
          try { await api("DELETE", `/v1/users/${user.user_id}`); await listUsers(); } catch (error) { show(error); }
        };
        cell.append(button); row.append(cell);
        return row;
      }));
      show(null);
    } catch (error) { show(error); }
  }

  async function createUser() {
    try {
      const user = await api("POST", "/v1/users");
      $("created").textContent = `created ${user.user_id}; its token (shown once): ${user.token}`;
      await listUsers();
    } catch (error) { show(error); }
  }

  $("signin-form").addEventListener("submit", signIn);
  $("signout").addEventListener("click", signOut);
  $("personalize").addEventListener("click", personalize);
  $("ask").addEventListener("click", ask);
  $("create-user").addEventListener("click", createUser);
  $("items-file").addEventListener("change", async (event) => {
    const file = event.target.files[0];
    if (file) $("items").value = await file.text();
  });
})();
