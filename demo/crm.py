"""The bundled sample CRM: a company directory, the routing table that gives each lead
an owner, and the leads the agent saves, in a SQLite file of its own (``demo.store``)."""

from __future__ import annotations

from pathlib import Path

from demo.store import store_create, store_path

LEADS_DIR = Path(__file__).resolve().parent / "data" / "leads"

INDUSTRIES = ("software", "finance", "healthcare", "retail", "manufacturing", "other")
REGIONS = ("americas", "emea", "apac", "unknown")
SEGMENTS = ("enterprise", "midmarket", "smb")
# Above this score a lead goes into the CRM only once a person has looked (the CEL rule
# load_demo puts on the task's crm_lead_save grant).
APPROVAL_SCORE = 70

COMPANIES = [
    # domain, name, industry, employees, country, region
    ("contoso.example", "Contoso", "software", 4000, "DE", "emea"),
    ("fabrikam.example", "Fabrikam", "manufacturing", 350, "US", "americas"),
    ("tailspin.example", "Tailspin Studio", "software", 12, "IN", "apac"),
    ("woodgrove.example", "Woodgrove Bank", "finance", 9000, "GB", "emea"),
    ("northwind.example", "Northwind Traders", "retail", 1200, "US", "americas"),
    ("lucerne.example", "Lucerne Health", "healthcare", 150, "CA", "americas"),
]

ROUTES = [
    # region, segment, owner
    ("emea", "enterprise", "mara.jensen@sales.example"),
    ("emea", "midmarket", "luc.moreau@sales.example"),
    ("emea", "smb", "emea-team@sales.example"),
    ("americas", "enterprise", "jordan.reyes@sales.example"),
    ("americas", "midmarket", "casey.lee@sales.example"),
    ("americas", "smb", "americas-team@sales.example"),
    ("apac", "enterprise", "kenji.sato@sales.example"),
    ("apac", "midmarket", "apac-team@sales.example"),
    ("apac", "smb", "apac-team@sales.example"),
    ("unknown", "enterprise", "inbound@sales.example"),
    ("unknown", "midmarket", "inbound@sales.example"),
    ("unknown", "smb", "inbound@sales.example"),
]
OWNERS = tuple(sorted({owner for _, _, owner in ROUTES}))

SCHEMA = """
CREATE TABLE company (domain TEXT PRIMARY KEY, name TEXT NOT NULL, industry TEXT NOT NULL,
                      employees INTEGER NOT NULL, country TEXT NOT NULL, region TEXT NOT NULL);
CREATE TABLE route (region TEXT NOT NULL, segment TEXT NOT NULL, owner TEXT NOT NULL,
                    PRIMARY KEY (region, segment));
CREATE TABLE lead (email TEXT PRIMARY KEY COLLATE NOCASE, name TEXT NOT NULL, company TEXT NOT NULL,
                   score INTEGER NOT NULL, owner TEXT NOT NULL, run_id TEXT NOT NULL,
                   saved_at TEXT NOT NULL DEFAULT (datetime('now')));
"""

# The score: how big the company is, and how well its industry fits.
SIZE_POINTS = {"enterprise": 50, "midmarket": 35, "smb": 15}
INDUSTRY_POINTS = {
    "software": 30,
    "finance": 25,
    "healthcare": 20,
    "retail": 15,
    "manufacturing": 15,
    "other": 5,
}


def crm_path() -> Path:
    return store_path("crm")


def crm_create(path: Path | None = None) -> Path:
    """(Re)build the sample CRM: the directory and the routing table, no leads."""
    return store_create(path or crm_path(), SCHEMA, {"company": COMPANIES, "route": ROUTES})


def score_for(industry: str, employees: int) -> int:
    """A lead's score: how big its company is, and how well its industry fits."""
    return SIZE_POINTS[segment_of(employees)] + INDUSTRY_POINTS[industry]


def segment_of(employees: int) -> str:
    if employees >= 1000:
        return "enterprise"
    if employees >= 100:
        return "midmarket"
    return "smb"


def lead_files() -> dict[str, Path]:
    """The bundled sample leads (webhook bodies), by name (the file's name without .json)."""
    return {path.stem: path for path in sorted(LEADS_DIR.glob("*.json"))}
