-- Every materialized view runs with its definer's rights (the user that ran `edgelog setup`), so
-- the loader's user needs INSERT on http_log and nothing else: no SELECT on the raw rows it fed,
-- no rights on the rollups. ClickHouse 26.9 defaults new materialized views to SQL SECURITY
-- DEFINER only when the statement says so (ignore_empty_sql_security_in_create_view_query): views
-- created by migrations 002-006 stored none and ran with the INSERTing user's rights (measured:
-- a loader with INSERT on http_log alone got ACCESS_DENIED "while pushing to view"). This sets it
-- explicitly on the views of new and existing databases alike.
ALTER TABLE ${database}.http_log_totals_mv MODIFY SQL SECURITY DEFINER DEFINER = CURRENT_USER;
ALTER TABLE ${database}.http_log_totals_by_resource_mv MODIFY SQL SECURITY DEFINER DEFINER = CURRENT_USER;
ALTER TABLE ${database}.http_log_totals_by_ip_mv MODIFY SQL SECURITY DEFINER DEFINER = CURRENT_USER;
ALTER TABLE ${database}.http_log_totals_by_status_mv MODIFY SQL SECURITY DEFINER DEFINER = CURRENT_USER;
ALTER TABLE ${database}.http_log_totals_by_resource_1h_mv MODIFY SQL SECURITY DEFINER DEFINER = CURRENT_USER;
ALTER TABLE ${database}.http_log_totals_by_status_1h_mv MODIFY SQL SECURITY DEFINER DEFINER = CURRENT_USER;
ALTER TABLE ${database}.http_log_top_1h_mv MODIFY SQL SECURITY DEFINER DEFINER = CURRENT_USER;
ALTER TABLE ${database}.http_log_top_1d_mv MODIFY SQL SECURITY DEFINER DEFINER = CURRENT_USER;
ALTER TABLE ${database}.http_log_totals_by_ip_resource_1d_mv MODIFY SQL SECURITY DEFINER DEFINER = CURRENT_USER;
