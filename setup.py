from pathlib import Path

from setuptools import find_packages, setup

# Pins live in requirements.txt; the package itself states the ranges it works with.
setup(
    name="trainingmgr",
    version="0.1.0",
    description="Training Manager of an O-RAN AI/ML framework",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["trainingmgr", "trainingmgr.*"]),
    # The web console's templates, script, styles and vendored chart library.
    package_data={"trainingmgr": ["templates/console/*.html", "static/console/*.js", "static/console/*.css",
                                  "static/console/vendor/*"]},
    install_requires=[
        "alembic>=1.13,<2",
        "click>=8.1,<9",
        "cryptography>=42",
        "Flask>=3.0,<4",
        "Flask-Cors>=6,<7",
        "Flask-Migrate>=4.0,<5",
        "Flask-SQLAlchemy>=3.1,<4",
        "gunicorn>=22",
        "marshmallow>=4,<5",
        "psycopg2-binary>=2.9,<3",
        "PyJWT[crypto]>=2.15,<3",
        "PyYAML>=6",
        "requests>=2.31,<3",
        "SQLAlchemy>=2.0,<3",
        "swagger_ui_bundle>=1.1,<2",
    ],
    entry_points={"console_scripts": ["trainingmgr=trainingmgr.cli:main"]},
)
