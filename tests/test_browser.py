"""The pages in a real browser: Playwright driving Debian's Chromium (``/usr/bin/chromium``, headless; never a
downloaded browser) against the app served by uvicorn on loopback, on a fresh SQLite database with the demo
patients. ``CNIDOSE_SCREENSHOTS=DIR`` also saves screenshots of the main pages (docs/screenshots)."""

from __future__ import annotations

import datetime as dt
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cnidose.records.db import make_engine, upgrade
from cnidose.records.demo import seed_demo
from cnidose.records.store import SYSTEM, Store
from cnidose.web.app import create_app
from cnidose.web.security import hash_password

CHROMIUM = os.environ.get("CNIDOSE_CHROMIUM", "/usr/bin/chromium")
# how long a page may take to show a fit's result (ms): a real MAP fit, posterior draws and the regimen search, about
# 1.5 s on a quiet 2-core machine and several times that on a loaded one (Playwright's default wait is 5 s)
FIT_WAIT = 30_000
SHOTS = os.environ.get("CNIDOSE_SCREENSHOTS")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, int]]]:
    if not Path(CHROMIUM).exists():
        if os.environ.get("CNIDOSE_REQUIRE_BROWSER") == "1":
            raise AssertionError(f"no Chromium at {CHROMIUM}")
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    import uvicorn

    engine = make_engine(f"sqlite:///{tmp_path_factory.mktemp('browser') / 'cnidose.db'}")
    upgrade(engine)
    store = Store(engine)
    ids = seed_demo(store)
    # copies of the demo kidney recipient under Czech names, never fitted: one per viewport of the decision-aid test
    from cnidose.records.exchange import chart_to_record_document, import_record

    doc = chart_to_record_document(store.chart(SYSTEM, ids["DEMO-TX-1"]))
    for width, (family, given) in ((1280, ("Dvořák", "Jiří")), (390, ("Nováková", "Růžena"))):
        ids[f"U-{width}"] = import_record(store, SYSTEM, {**doc, "id": f"U-{width}"}, family_name=family,
                                          given_name=given)
    for name, role, mrn in (("clin", "clinician", None), ("karel", "patient", "DEMO-TX-1"),
                            ("petra", "patient", "DEMO-DERM-1")):
        store.create_user(SYSTEM, name, hash_password(f"{name}-pw"), role, patient_id=ids[mrn] if mrn else None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # the library's compiled kernels ready before any page asks for a fit (as `cnidose serve` warms them; on a fresh
    # machine their first compilation takes a minute)
    from cnidose.models.kernel import warm
    from cnidose.models.library import library_models

    warm(library_models()).join()
    # the app in a zone other than UTC (times typed and shown in Europe/Prague, stored in UTC)
    srv = uvicorn.Server(uvicorn.Config(create_app(store, secret_key="browser", timezone="Europe/Prague"),
                                        host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", ids
    srv.should_exit = True
    thread.join(timeout=10)
    engine.dispose()


@pytest.fixture(scope="module")
def browser(server: tuple[str, dict[str, int]]) -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                              args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield b
        b.close()


def _shot(page: object, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / f"{name}.png"), full_page=True)  # type: ignore[attr-defined]


def _contrast(fg: str, bg: str) -> float:
    """WCAG 2 contrast ratio of two CSS rgb()/rgba() colours."""
    def lum(css: str) -> float:
        r, g, b = (int(x) / 255 for x in re.findall(r"[\d.]+", css)[:3])
        lin = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in (r, g, b)]
        return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]
    hi, lo = sorted((lum(fg), lum(bg)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def _sign_in(page: object, base: str, user: str) -> None:
    page.goto(f"{base}/login")  # type: ignore[attr-defined]
    page.fill("#username", user)  # type: ignore[attr-defined]
    page.fill("#password", f"{user}-pw")  # type: ignore[attr-defined]
    page.click("#sign-in")  # type: ignore[attr-defined]
    # signed in when the next page has loaded: a check made at once may land mid-navigation (no document yet)
    page.wait_for_url(lambda url: not url.split("?")[0].endswith("/login"))  # type: ignore[attr-defined]
    page.wait_for_load_state()  # type: ignore[attr-defined]


def test_clinician_adds_a_trough_gets_a_recommendation_signs_and_books(server: tuple[str, dict[str, int]],
                                                                       browser: object) -> None:
    from playwright.sync_api import expect

    base, ids = server
    page = browser.new_page(viewport={"width": 1200, "height": 900})  # type: ignore[attr-defined]
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    # the console stays clean: no missing resource (the icon included), no script error, no CSP violation
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    _sign_in(page, base, "clin")
    expect(page.locator("#patients")).to_contain_text("DEMO-TX-1")
    _shot(page, "patients")
    # every badge is legible: its text colour against its background has a contrast ratio of 4.5 or more (WCAG)
    pairs = page.eval_on_selector_all(  # type: ignore[attr-defined]
        ".badge", "bs => bs.map(b => [getComputedStyle(b).color, getComputedStyle(b).backgroundColor, b.textContent])")
    assert pairs and all(_contrast(fg, bg) >= 4.5 for fg, bg, _ in pairs), pairs
    page.click("text=Demo, Karel")
    expect(page.locator("#patient-name")).to_have_text("Demo, Karel")
    # htmx (served by the app) posts the forms below in place: a mark set on this page must survive them all
    assert page.evaluate("typeof htmx !== 'undefined' && htmx.version.startsWith('2')")  # type: ignore[attr-defined]
    page.evaluate("window.cnidoseSamePage = true")  # type: ignore[attr-defined]
    # a trough drawn this morning
    now = dt.datetime.now(dt.UTC).replace(second=0, microsecond=0) - dt.timedelta(hours=1)
    page.fill("#level-value", "11.2")
    page.fill("#level-time", now.strftime("%Y-%m-%dT%H:%M"))
    page.click("#add-level")
    expect(page.locator("#timeline")).to_contain_text("11.2 ng/mL")
    # typed and shown as the same wall-clock time, the zone named on the form and the table
    expect(page.locator("#observations tr", has_text="11.2 ng/mL")).to_contain_text(now.strftime("%Y-%m-%d %H:%M"))
    expect(page.locator("#level-form")).to_contain_text("Drawn at (Europe/Prague)")
    expect(page.locator("#observations")).to_contain_text("When (Europe/Prague)")
    # fit and recommend: the curve is drawn (Plotly served by the app) and the recommendation shown
    page.click("#run-assessment")
    expect(page.locator(".recommendation").first).to_contain_text("give ", timeout=FIT_WAIT)
    expect(page.locator("#curve-plot .main-svg").first).to_be_visible()
    expect(page.locator(".assessment").first).to_contain_text("andrews2019_tac_adult_kidney")
    _shot(page, "patient")
    # sign the decision
    page.locator(".sign-button").first.click()
    expect(page.locator(".assessment").first).to_contain_text("signed")
    # book the follow-ups the assessment lists: in the transplant clinic, each one said
    page.click("#book-follow-ups")
    expect(page.locator("#appointment-list")).to_contain_text("BK virus")
    expect(page.locator("#follow-up-report")).to_contain_text("transplant clinic")
    # a lab: the unit offered is the chosen test's (potassium in mmol/L, not creatinine's umol/L)
    page.select_option("#lab-name", "potassium")
    assert page.input_value("#lab-unit") == "mmol/L"  # type: ignore[attr-defined]
    enabled = page.eval_on_selector_all(  # type: ignore[attr-defined]
        "#lab-unit option", "os => os.filter(o => !o.disabled && !o.parentElement.disabled).map(o => o.value)")
    assert enabled == ["mmol/L", "mEq/L"], enabled
    page.fill("#lab-form input[name=value]", "4.6")
    page.fill("#lab-form input[name=observed_at]", now.strftime("%Y-%m-%dT%H:%M"))
    page.click("#lab-form button[type=submit]")
    expect(page.locator("body")).to_contain_text("4.6 mmol/L")
    page.select_option("#lab-name", "creatinine")
    assert page.input_value("#lab-unit") == "umol/L"  # type: ignore[attr-defined]
    assert not errors, errors
    # a field error is shown next to the field, and nothing is stored
    page.fill("#level-value", "8000")
    page.fill("#level-time", now.strftime("%Y-%m-%dT%H:%M"))
    page.click("#add-level")
    expect(page.locator("#level-error")).to_contain_text("if the unit is ng/L")
    assert page.evaluate("window.cnidoseSamePage === true"), "a form reloaded the page instead of swapping"  # type: ignore[attr-defined]
    page.click("#logout")
    expect(page).to_have_url(f"{base}/login")
    page.goto(f"{base}/patients/{ids['DEMO-TX-1']}")
    expect(page).to_have_url(f"{base}/login?next=/patients/{ids['DEMO-TX-1']}")
    assert all(u.startswith(base) for u in requests), [u for u in requests if not u.startswith(base)]
    page.close()


def test_patient_sees_own_record_not_another(server: tuple[str, dict[str, int]], browser: object) -> None:
    from playwright.sync_api import expect

    base, ids = server
    page = browser.new_page()  # type: ignore[attr-defined]
    _sign_in(page, base, "petra")
    expect(page.locator("#patient-name")).to_have_text("Demo, Petra")
    expect(page.locator("#alerts")).to_contain_text("eGFR")
    assert page.locator("#level-form").count() == 0  # no entry forms for patients
    response = page.goto(f"{base}/patients/{ids['DEMO-TX-1']}")
    assert response is not None and response.status == 403
    page.close()


def test_public_booking_form(server: tuple[str, dict[str, int]], browser: object) -> None:
    from playwright.sync_api import expect

    base, _ = server
    page = browser.new_page()  # type: ignore[attr-defined]
    page.goto(f"{base}/book")
    when = (dt.datetime.now(dt.UTC) + dt.timedelta(days=9)).replace(hour=10, minute=0)
    page.fill("#starts-at", when.strftime("%Y-%m-%dT%H:%M"))
    page.fill("#contact-name", "Ann Example")
    page.fill("#contact-email", "ann@example.org")
    page.fill("#reason", "atopic dermatitis, topical treatment not enough")
    _shot(page, "booking")
    page.click("#request-booking")
    expect(page.locator("#booking-done")).to_contain_text("registered")
    page.close()


def test_demo_transplant_alerts_entry_confirmation_and_withdrawal(server: tuple[str, dict[str, int]],
                                                                  browser: object) -> None:
    """Issue 13: the demo kidney recipient shows the creatinine rise, the troughs above target and the blood
    pressure, each with its action and source; a suspicious entry asks for confirmation and keeps its flag; an
    entry marked entered in error is struck through and leaves the alerts."""
    from playwright.sync_api import expect

    base, ids = server
    page = browser.new_page(viewport={"width": 1280, "height": 900})  # type: ignore[attr-defined]
    _sign_in(page, base, "clin")
    page.goto(f"{base}/patients/{ids['DEMO-TX-1']}")
    alerts = page.locator("#alerts")
    expect(alerts).to_contain_text("above the post-transplant baseline")
    expect(alerts).to_contain_text("above the target 4-11 ng/mL")
    expect(alerts).to_contain_text("readings at or above 130/80 mmHg")
    for text in ("KDIGO 2009 transplant guideline", "US Prograf label, Table 1", "KDOQI 2004"):
        expect(alerts).to_contain_text(text)
    expect(alerts).to_contain_text("check the calcineurin-inhibitor level")  # the action
    expect(page.locator("#current-regimen")).to_contain_text("Prograf 5 mg every 12 h")
    # a level implausible for the regimen: a confirmation, then stored with its flag
    now = dt.datetime.now(dt.UTC).replace(second=0, microsecond=0) - dt.timedelta(hours=2)
    page.fill("#level-value", "150")
    page.fill("#level-time", now.strftime("%Y-%m-%dT%H:%M"))
    page.click("#add-level")
    expect(page.locator("#confirm-flags")).to_contain_text("implausible for the regimen")
    page.click("#confirm-entry")
    row = page.locator("#observations tr", has_text="150 ng/mL")
    expect(row).to_contain_text("flagged:")
    # withdrawn: struck through, with its reason
    row.locator("input[name=reason]").fill("sample drawn from the infusion line")
    row.locator(".withdraw-button").click()
    row = page.locator("#observations tr", has_text="150 ng/mL")
    expect(row).to_have_class("entered-in-error")
    expect(row).to_contain_text("entered in error: sample drawn from the infusion line")
    assert row.locator("td").first.evaluate(  # type: ignore[attr-defined]
        "e => getComputedStyle(e).textDecorationLine") == "line-through"
    # a dose far from the regimen and of another product: confirmed, then flagged in the timeline
    page.fill("#dose-form input[name=amount]", "50")
    page.fill("#dose-form input[name=product]", "Advagraf")
    page.fill("#dose-form input[name=given_at]", now.strftime("%Y-%m-%dT%H:%M"))
    page.click("#dose-form button[type=submit]")
    expect(page.locator("#confirm-flags")).to_contain_text("10 times the regimen's 5 mg")
    expect(page.locator("#confirm-flags")).to_contain_text("not the regimen's (Prograf)")
    page.click("#confirm-entry")
    page.click("#timeline summary")  # the doses table is folded
    expect(page.locator("#doses tr", has_text="Advagraf")).to_contain_text("flagged:")
    # a time in the future is refused at the field
    page.fill("#level-value", "8")
    page.fill("#level-time", (now + dt.timedelta(days=2)).strftime("%Y-%m-%dT%H:%M"))
    page.click("#add-level")
    expect(page.locator("#level-error")).to_contain_text("in the future")
    # a regimen change shows at once as the current regimen (after the swaps the last entries triggered have
    # settled: a box re-rendered under the typing would drop what was typed)
    page.wait_for_load_state("networkidle")
    page.fill("#regimen-form input[name=dose]", "3")
    page.fill("#regimen-form input[name=start_at]", now.strftime("%Y-%m-%dT%H:%M"))
    page.click("#add-regimen")
    expect(page.locator("#current-regimen")).to_contain_text("Prograf 3 mg every 12 h")
    page.close()


AXE = Path(__file__).resolve().parent.parent / "node_modules" / "axe-core" / "axe.min.js"


def _axe_serious(page: object) -> list[dict[str, object]]:
    """axe-core (from the npm registry, installed by scripts/test; injected from the local file through the
    DevTools protocol, which the pages' CSP does not govern) on the page: its serious and critical violations."""
    if not AXE.exists():
        if os.environ.get("CNIDOSE_REQUIRE_BROWSER") == "1":
            raise AssertionError(f"no axe-core at {AXE}: run npm ci")
        pytest.skip("axe-core not installed (npm ci)")
    page.evaluate(AXE.read_text("utf-8"))  # type: ignore[attr-defined]
    found = page.evaluate(  # type: ignore[attr-defined]
        "async () => (await axe.run(document, {resultTypes: ['violations']})).violations"
        ".filter(v => v.impact === 'serious' || v.impact === 'critical')"
        ".map(v => ({id: v.id, impact: v.impact, nodes: v.nodes.slice(0, 3).map(n => n.target.join(' '))}))")
    return list(found)


def _fits(page: object, width: int) -> bool:
    """Nothing on the page is wider than the screen (a wide table scrolls inside its own box); the culprits
    (elements reaching past the right edge outside any scrolling box) are printed when it is not so."""
    if page.evaluate(f"document.documentElement.scrollWidth <= {width}"):  # type: ignore[attr-defined]
        return True
    print("wider than the screen:", page.evaluate(  # type: ignore[attr-defined]
        "w => Array.from(document.querySelectorAll('body *')).filter(e => {"
        " if (e.getBoundingClientRect().right <= w + 1) return false;"
        " for (let a = e.parentElement; a; a = a.parentElement) {"
        "  if (['auto', 'hidden', 'scroll'].includes(getComputedStyle(a).overflowX)) return false; }"
        " return true; }).slice(0, 8).map(e => e.tagName + '#' + e.id + '.' + e.className)", width))
    return False


@pytest.mark.parametrize("width", [1280, 390])
def test_decision_aid_errors_at_the_field_inputs_in_view_and_every_page_at_phone_width(
        server: tuple[str, dict[str, int]], browser: object, width: int) -> None:
    """Issue 17, items 1-3 and 7-9, at 1280 and 390 px: levels and doses are plotted before any fit; a refused
    entry comes back at its field, in view, focused, with what was typed, and only its form is swapped; the fit
    shows the model, why it was chosen and every covariate it read with its source; the candidate table and the
    current and proposed regimens' forecast on one plot; another candidate chosen is the one signed; follow-ups
    land in the department's calendar under the patient's name; no page is wider than the screen; axe-core finds
    no serious violation."""
    from playwright.sync_api import expect

    base, ids = server
    pid = ids[f"U-{width}"]
    page = browser.new_page(viewport={"width": width, "height": 860})  # type: ignore[attr-defined]
    page.goto(f"{base}/login")
    assert _fits(page, width) and _axe_serious(page) == []
    _sign_in(page, base, "clin")
    assert _fits(page, width), "the patient list is wider than the screen"
    assert _axe_serious(page) == []
    page.goto(f"{base}/patients/{pid}")
    expect(page.locator("#patient-name")).to_contain_text(", ")
    # before any fit: the levels and the doses are on the plot, and the record's covariates in view
    expect(page.locator("#curve-plot .main-svg").first).to_be_visible()
    names = page.evaluate("document.getElementById('curve-plot').data.map(t => t.name)")  # type: ignore[attr-defined]
    assert "measured level" in names and "dose given" in names and not any("fit" in str(n) for n in names), names
    expect(page.locator("#current-regimen")).to_contain_text("Prograf 5 mg every 12 h")
    expect(page.locator("#model-covariates")).to_contain_text("HCT")
    assert _fits(page, width), "the patient page is wider than the screen"
    assert _axe_serious(page) == []
    # a refused entry: the message at the field, in view, the field focused, the typed values kept, only the
    # form swapped (a mark on the timeline survives)
    page.evaluate("document.getElementById('timeline').dataset.mark = 'kept'")  # type: ignore[attr-defined]
    when = (dt.datetime.now(dt.UTC) - dt.timedelta(hours=3)).strftime("%Y-%m-%dT%H:%M")
    page.fill("#level-value", "8000")
    page.fill("#level-time", when)
    page.click("#add-level")
    error = page.locator("#level-error")
    expect(error).to_contain_text("if the unit is ng/L")
    expect(error).to_be_in_viewport()
    assert page.input_value("#level-value") == "8000" and page.input_value("#level-time") == when  # type: ignore[attr-defined]
    expect(page.locator("#level-value")).to_be_focused()  # after htmx settles the swap (not at once)
    assert page.evaluate("document.getElementById('timeline').dataset.mark") == "kept"  # type: ignore[attr-defined]
    field_box = page.locator("#level-value").bounding_box()
    error_box = error.bounding_box()
    assert field_box and error_box and abs(error_box["y"] - field_box["y"]) < 160, (field_box, error_box)
    # fit: the model and why, every covariate with its source, candidates, both regimens on the plot
    page.click("#run-assessment")
    table = page.locator(".candidate-table").first
    expect(table).to_be_visible(timeout=FIT_WAIT)
    expect(page.locator("#model-used")).to_contain_text(
        "Why: tacrolimus, kidney, adult, Prograf; andrews2019_tac_adult_kidney is the default for tacrolimus, kidney, "
        "adult")
    expect(page.locator("#model-used")).to_contain_text("storset2014_tac_adult_kidney (not the default)")
    covariates = page.locator("#model-covariates")
    expect(covariates).to_contain_text("haematocrit")
    expect(covariates).to_contain_text("derived: BSA derived from WT, HT by bsa_mosteller")
    expect(covariates).to_contain_text("model default")
    names = page.evaluate("document.getElementById('curve-plot').data.map(t => t.name)")  # type: ignore[attr-defined]
    assert any(str(n).startswith("current: 5 mg every 12 h") for n in names), names
    assert any(str(n).startswith("proposed: ") for n in names) and "individual fit (median, 80 % band)" in names
    assert table.locator("tr.chosen").count() == 1 and table.locator("tbody tr").count() >= 3
    # the mechanism: what the concentrations do to calcineurin, by the published models, said to be educational
    mechanism = page.locator("#mechanism")
    expect(mechanism).to_contain_text("inhibition of calcineurin activity")
    expect(mechanism).to_contain_text("suppression of NFAT-regulated gene expression")
    expect(mechanism).to_contain_text("not validated for choosing a dose")
    expect(mechanism).to_contain_text("Clin Pharmacol Ther 2005;78(2):168-81")
    expect(page.locator("#pd-plot .main-svg").first).to_be_visible()
    _shot(page, f"decision-aid-{width}")
    assert _fits(page, width), "the fitted patient page is wider than the screen"
    assert _axe_serious(page) == []
    # by keyboard alone: from the recommended regimen, the arrow key picks another, Tab reaches the note, Enter
    # signs; the regimen chosen is the one signed
    table.locator("tr.chosen input[type=radio]").focus()
    page.keyboard.press("ArrowDown")
    picked = table.locator("input[type=radio]:checked")
    label = page.locator(f"label[for='{picked.get_attribute('id')}']").inner_text()
    assert table.locator("tr.chosen input[type=radio]:checked").count() == 0
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.name") == "decision"  # type: ignore[attr-defined]
    page.keyboard.type("chosen by keyboard")
    page.keyboard.press("Enter")
    decision = page.locator(".decision").first
    expect(decision).to_contain_text("Give " + label.split(" every ")[0])
    expect(decision).to_contain_text("chosen by keyboard")
    expect(page.locator(".signer").first).to_have_text("clin")
    # follow-ups: booked in the transplant clinic, whose calendar is one click away and names the patient
    page.click("#book-follow-ups")
    expect(page.locator("#follow-up-report")).to_contain_text("transplant clinic")
    page.goto(f"{base}/calendar")
    page.locator("#departments a", has_text="Transplant clinic").click()
    expect(page.locator("#calendar")).to_contain_text(page.locator("#calendar a").first.inner_text())
    expect(page.locator("#calendar")).to_contain_text(f"U-{width}")
    assert _fits(page, width), "the calendar is wider than the screen"
    assert _axe_serious(page) == []
    # an error is a page, not raw JSON
    response = page.goto(f"{base}/patients/999999")
    assert response is not None and response.status == 404
    expect(page.locator("#error-page")).to_contain_text("Not found")
    for path in ("/book", f"/patients/{pid}/report", "/account"):
        page.goto(f"{base}{path}")
        assert _fits(page, width), path
        assert _axe_serious(page) == [], path
    page.close()
