"""Drives moelab's web chat page in headless Chromium over the DevTools protocol: loads the
page, types a question into the box, presses Enter, waits for the streamed reply and prints
what the page shows (reasoning block and answer) as JSON for tests/serve.rs to check.

usage: python tests/web_chat.py PAGE_URL QUESTION [SCREENSHOT.png] [--cut error|eof]
(CHROMIUM names the browser binary; default `chromium`.)

--cut answers the page's chat request itself (DevTools' Fetch domain) with a cut stream: two
reasoning chunks, then the error event the server sends when its shutdown ends a reply
(`error`), or nothing more (`eof`: a body that ends cleanly without [DONE]; a connection
that breaks mid-body makes the browser's reader throw, another error path); neither has
[DONE].
"""
import argparse
import base64
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request

import websocket

ap = argparse.ArgumentParser()
ap.add_argument("url")
ap.add_argument("question")
ap.add_argument("screenshot", nargs="?")
ap.add_argument("--cut", choices=["error", "eof"])
args = ap.parse_args()
url, question, screenshot = args.url, args.question, args.screenshot

# shaped like what crates/server/src/openai.rs streams for a chat reply its shutdown cut (the
# fields the page reads; the message is the one the page must show)
CUT_CHUNKS = [
    {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
    {"choices": [{"index": 0, "delta": {"reasoning_content": "1+1: carry"}, "finish_reason": None}]},
    {"choices": [{"index": 0, "delta": {"reasoning_content": " 0"}, "finish_reason": None}]},
]
CUT_ERROR = {"error": {"message": "the server shut down before the reply was finished; retry",
                       "type": "server_error", "param": None, "code": "server_shutdown"}}
profile = tempfile.mkdtemp(prefix="moelab-chromium-")
browser = subprocess.Popen(
    [os.environ.get("CHROMIUM", "chromium"), "--headless=new", "--no-sandbox", "--disable-gpu",
     "--no-first-run", "--disable-extensions", "--remote-debugging-port=0",
     "--remote-allow-origins=*", f"--user-data-dir={profile}", "about:blank"],
    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
try:
    port = None
    deadline = time.time() + 30
    while port is None and time.time() < deadline:
        line = browser.stderr.readline()
        if not line and browser.poll() is not None:
            sys.exit(f"chromium exited with {browser.returncode}")
        m = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
        if m:
            port = m.group(1)
    if port is None:
        sys.exit("chromium did not open its DevTools port within 30 s")
    targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list"))
    page = next(t for t in targets if t["type"] == "page")
    ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=30, suppress_origin=True)
    next_id = 0
    events = []  # DevTools events that arrived while waiting for a reply

    def cdp(method, **params):
        global next_id
        next_id += 1
        ws.send(json.dumps({"id": next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(ws.recv())
            if "method" in msg:
                events.append(msg)
            elif msg.get("id") == next_id:
                if "error" in msg:
                    sys.exit(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def js(expr):
        r = cdp("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            sys.exit(f"page script failed: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_for(expr, what, secs=60):
        end = time.time() + secs
        while time.time() < end:
            v = js(expr)
            if v:
                return v
            time.sleep(0.1)
        sys.exit(f"timed out waiting for {what}; at {js('location.href')!r}, page text: {js('document.body && document.body.innerText')!r}")

    cdp("Page.enable")
    cdp("Emulation.setDeviceMetricsOverride", width=900, height=640, deviceScaleFactor=1, mobile=False)
    cdp("Page.navigate", url=url)
    wait_for("document.readyState === 'complete' && !!document.getElementById('model') && "
             "document.getElementById('model').textContent !== 'connecting…'",
             "the page to load and list the model")
    if args.cut:
        cdp("Fetch.enable", patterns=[{"urlPattern": "*/v1/chat/completions"}])
    js("document.getElementById('input').focus()")
    cdp("Input.insertText", text=question)
    for kind in ("keyDown", "keyUp"):
        cdp("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13)
    if args.cut:
        end = time.time() + 30
        ws.settimeout(1)
        while not any(e["method"] == "Fetch.requestPaused" for e in events):
            if time.time() > end:
                sys.exit("the page sent no chat request within 30 s")
            try:
                msg = json.loads(ws.recv())
            except websocket.WebSocketTimeoutException:
                continue
            if "method" in msg:
                events.append(msg)
        ws.settimeout(30)
        paused = next(e for e in events if e["method"] == "Fetch.requestPaused")
        body = "".join(f"data: {json.dumps(c)}\n\n" for c in CUT_CHUNKS)
        if args.cut == "error":
            body += f"data: {json.dumps(CUT_ERROR)}\n\n"
        cdp("Fetch.fulfillRequest", requestId=paused["params"]["requestId"], responseCode=200,
            responseHeaders=[{"name": "content-type", "value": "text/event-stream"}],
            body=base64.b64encode(body.encode()).decode())
    wait_for("document.querySelector('.msg.assistant[data-done]') !== null", "the reply")
    shown = js("""(() => {
      const m = document.querySelector('.msg.assistant');
      const d = m.querySelector('details.reasoning');
      return {done: m.dataset.done, model: document.getElementById('model').textContent,
              user: document.querySelector('.msg.user .answer').textContent,
              reasoning: d.querySelector('pre').textContent, reasoning_visible: !d.hidden,
              reasoning_folded: !d.open, summary: d.querySelector('summary').textContent,
              answer: m.querySelector('.answer').textContent,
              error: (m.querySelector('.error') || {}).textContent || null,
              history: history.length, button: document.getElementById('send').textContent};
    })()""")
    if screenshot:
        js("document.querySelectorAll('details.reasoning').forEach(d => d.open = true)")
        shot = cdp("Page.captureScreenshot", format="png")
        with open(screenshot, "wb") as f:
            f.write(base64.b64decode(shot["data"]))
    print(json.dumps(shown))
finally:
    browser.kill()
    browser.wait()
