-- An Optuna study as score_exp stored it before Optuna 4: optuna 2.10.1 + SQLAlchemy 1.4.54
-- (storage schema v2.6.0.a), shaped like Hydra's Optuna sweeper 1.2 wrote it (the sampled values
-- as params, every fixed override as a user attribute). Made in a throwaway venv with
-- optuna.create_study(storage=sqlite) + add_trial, then sqlite3's iterdump (text: the .db is 110 KB).
BEGIN TRANSACTION;
CREATE TABLE alembic_version (
	version_num VARCHAR(32) NOT NULL, 
	CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num)
);
INSERT INTO "alembic_version" VALUES('v2.6.0.a');
CREATE TABLE studies (
	study_id INTEGER NOT NULL, 
	study_name VARCHAR(512) NOT NULL, 
	PRIMARY KEY (study_id)
);
INSERT INTO "studies" VALUES(1,'tune_esol_mlp_score');
CREATE TABLE study_directions (
	study_direction_id INTEGER NOT NULL, 
	direction VARCHAR(8) NOT NULL, 
	study_id INTEGER NOT NULL, 
	objective INTEGER NOT NULL, 
	PRIMARY KEY (study_direction_id), 
	UNIQUE (study_id, objective), 
	FOREIGN KEY(study_id) REFERENCES studies (study_id)
);
INSERT INTO "study_directions" VALUES(1,'MINIMIZE',1,0);
CREATE TABLE study_system_attributes (
	study_system_attribute_id INTEGER NOT NULL, 
	study_id INTEGER, 
	"key" VARCHAR(512), 
	value_json TEXT, 
	PRIMARY KEY (study_system_attribute_id), 
	UNIQUE (study_id, "key"), 
	FOREIGN KEY(study_id) REFERENCES studies (study_id)
);
CREATE TABLE study_user_attributes (
	study_user_attribute_id INTEGER NOT NULL, 
	study_id INTEGER, 
	"key" VARCHAR(512), 
	value_json TEXT, 
	PRIMARY KEY (study_user_attribute_id), 
	UNIQUE (study_id, "key"), 
	FOREIGN KEY(study_id) REFERENCES studies (study_id)
);
CREATE TABLE trial_heartbeats (
	trial_heartbeat_id INTEGER NOT NULL, 
	trial_id INTEGER NOT NULL, 
	heartbeat DATETIME NOT NULL, 
	PRIMARY KEY (trial_heartbeat_id), 
	UNIQUE (trial_id), 
	FOREIGN KEY(trial_id) REFERENCES trials (trial_id)
);
CREATE TABLE trial_intermediate_values (
	trial_intermediate_value_id INTEGER NOT NULL, 
	trial_id INTEGER NOT NULL, 
	step INTEGER NOT NULL, 
	intermediate_value FLOAT NOT NULL, 
	PRIMARY KEY (trial_intermediate_value_id), 
	UNIQUE (trial_id, step), 
	FOREIGN KEY(trial_id) REFERENCES trials (trial_id)
);
CREATE TABLE trial_params (
	param_id INTEGER NOT NULL, 
	trial_id INTEGER, 
	param_name VARCHAR(512), 
	param_value FLOAT, 
	distribution_json TEXT, 
	PRIMARY KEY (param_id), 
	UNIQUE (trial_id, param_name), 
	FOREIGN KEY(trial_id) REFERENCES trials (trial_id)
);
INSERT INTO "trial_params" VALUES(1,1,'task.module.lr',0.0012,'{"name": "LogUniformDistribution", "attributes": {"low": 0.0001, "high": 0.003}}');
INSERT INTO "trial_params" VALUES(2,1,'task.module.weight_decay',0.0001,'{"name": "LogUniformDistribution", "attributes": {"low": 1e-06, "high": 0.01}}');
INSERT INTO "trial_params" VALUES(3,1,'task.model.dropout',0.1,'{"name": "UniformDistribution", "attributes": {"low": 0.0, "high": 0.3}}');
INSERT INTO "trial_params" VALUES(4,2,'task.module.lr',0.0003,'{"name": "LogUniformDistribution", "attributes": {"low": 0.0001, "high": 0.003}}');
INSERT INTO "trial_params" VALUES(5,2,'task.module.weight_decay',2.0e-05,'{"name": "LogUniformDistribution", "attributes": {"low": 1e-06, "high": 0.01}}');
INSERT INTO "trial_params" VALUES(6,2,'task.model.dropout',0.2,'{"name": "UniformDistribution", "attributes": {"low": 0.0, "high": 0.3}}');
CREATE TABLE trial_system_attributes (
	trial_system_attribute_id INTEGER NOT NULL, 
	trial_id INTEGER, 
	"key" VARCHAR(512), 
	value_json TEXT, 
	PRIMARY KEY (trial_system_attribute_id), 
	UNIQUE (trial_id, "key"), 
	FOREIGN KEY(trial_id) REFERENCES trials (trial_id)
);
CREATE TABLE trial_user_attributes (
	trial_user_attribute_id INTEGER NOT NULL, 
	trial_id INTEGER, 
	"key" VARCHAR(512), 
	value_json TEXT, 
	PRIMARY KEY (trial_user_attribute_id), 
	UNIQUE (trial_id, "key"), 
	FOREIGN KEY(trial_id) REFERENCES trials (trial_id)
);
INSERT INTO "trial_user_attributes" VALUES(1,1,'experiment','"tune_esol_mlp_cpu"');
INSERT INTO "trial_user_attributes" VALUES(2,1,'depth','"score"');
INSERT INTO "trial_user_attributes" VALUES(3,1,'hydra.sweeper.sampler.seed','0');
INSERT INTO "trial_user_attributes" VALUES(4,1,'hydra/launcher','"joblib"');
INSERT INTO "trial_user_attributes" VALUES(5,1,'hydra.launcher.n_jobs','2');
INSERT INTO "trial_user_attributes" VALUES(6,1,'hydra.sweeper.n_jobs','2');
INSERT INTO "trial_user_attributes" VALUES(7,1,'trainer.enable_progress_bar','false');
INSERT INTO "trial_user_attributes" VALUES(8,1,'hydra.sweep.dir','"multirun/tune_cpu/esol_mlp/study0/score"');
INSERT INTO "trial_user_attributes" VALUES(9,1,'task.max_epochs','2');
INSERT INTO "trial_user_attributes" VALUES(10,1,'task.model.hidden','16');
INSERT INTO "trial_user_attributes" VALUES(11,2,'experiment','"tune_esol_mlp_cpu"');
INSERT INTO "trial_user_attributes" VALUES(12,2,'depth','"score"');
INSERT INTO "trial_user_attributes" VALUES(13,2,'hydra.sweeper.sampler.seed','0');
INSERT INTO "trial_user_attributes" VALUES(14,2,'hydra/launcher','"joblib"');
INSERT INTO "trial_user_attributes" VALUES(15,2,'hydra.launcher.n_jobs','2');
INSERT INTO "trial_user_attributes" VALUES(16,2,'hydra.sweeper.n_jobs','2');
INSERT INTO "trial_user_attributes" VALUES(17,2,'trainer.enable_progress_bar','false');
INSERT INTO "trial_user_attributes" VALUES(18,2,'hydra.sweep.dir','"multirun/tune_cpu/esol_mlp/study0/score"');
INSERT INTO "trial_user_attributes" VALUES(19,2,'task.max_epochs','2');
INSERT INTO "trial_user_attributes" VALUES(20,2,'task.model.hidden','16');
CREATE TABLE trial_values (
	trial_value_id INTEGER NOT NULL, 
	trial_id INTEGER NOT NULL, 
	objective INTEGER NOT NULL, 
	value FLOAT NOT NULL, 
	PRIMARY KEY (trial_value_id), 
	UNIQUE (trial_id, objective), 
	FOREIGN KEY(trial_id) REFERENCES trials (trial_id)
);
INSERT INTO "trial_values" VALUES(1,1,0,0.71);
INSERT INTO "trial_values" VALUES(2,2,0,0.93);
CREATE TABLE trials (
	trial_id INTEGER NOT NULL, 
	number INTEGER, 
	study_id INTEGER, 
	state VARCHAR(8) NOT NULL, 
	datetime_start DATETIME, 
	datetime_complete DATETIME, 
	PRIMARY KEY (trial_id), 
	FOREIGN KEY(study_id) REFERENCES studies (study_id)
);
INSERT INTO "trials" VALUES(1,0,1,'COMPLETE','2026-12-07 21:03:02.861477','2026-12-07 21:03:02.861477');
INSERT INTO "trials" VALUES(2,1,1,'COMPLETE','2026-12-07 21:03:02.943448','2026-12-07 21:03:02.943448');
CREATE TABLE version_info (
	version_info_id INTEGER NOT NULL, 
	schema_version INTEGER, 
	library_version VARCHAR(256), 
	PRIMARY KEY (version_info_id), 
	CHECK (version_info_id=1)
);
INSERT INTO "version_info" VALUES(1,12,'2.10.1');
CREATE UNIQUE INDEX ix_studies_study_name ON studies (study_name);
COMMIT;
