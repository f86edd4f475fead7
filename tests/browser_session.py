"""Logging in through the real login form, as a browser does, to get a session cookie."""

from __future__ import annotations

import http.cookiejar
import re
import urllib.parse
import urllib.request


def login(base_url: str, username: str, password: str) -> tuple[urllib.request.OpenerDirector, str]:
    """(an opener that carries the session, the Cookie header value)."""
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    page = opener.open(f"{base_url}/login/", timeout=30).read().decode()
    csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page)
    assert csrf, "the login form has a CSRF token"
    form = urllib.parse.urlencode(
        {"username": username, "password": password, "csrfmiddlewaretoken": csrf.group(1)}
    ).encode()
    request = urllib.request.Request(f"{base_url}/login/", data=form, headers={"Referer": f"{base_url}/login/"})
    opener.open(request, timeout=30).read()
    cookies = {cookie.name: cookie.value for cookie in jar}
    assert "sessionid" in cookies, "logged in"
    return opener, "; ".join(f"{name}={value}" for name, value in cookies.items())
