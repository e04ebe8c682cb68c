-- MLflow's tracking database (the platform's own database, qwenvl, is POSTGRES_DB).
CREATE DATABASE mlflow;
