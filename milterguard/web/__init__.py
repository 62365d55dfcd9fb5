"""The web console: an ASGI app (Starlette, served by uvicorn) over the quarantine's
database, pages rendered on the server (Jinja2) with no script at all.

    app.py         the app: the console's state, security headers, sessions, CSRF, login
    quarantine.py  the quarantine pages and the digest's signed links
    pages.py       overview, history, symbols, test a message, lists, audit
    charts.py      the overview's charts as SVG
    preview.py     the safe preview of a held message
    command.py     `milterguard web`
"""
