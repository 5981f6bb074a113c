//! The connector admin API end to end (issue 20): each broker connector whose dead-letter
//! store the admin API serves, its real binary against its real broker (see
//! `integration_tests::admin` for the steps and what each proves).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use integration_tests::admin::admin_api_lists_replays_and_purges;
use integration_tests::kafka_broker::KafkaTopics;
use integration_tests::mqtt_broker::MqttTopics;
use integration_tests::nats_broker::JetStreamTopics;
use integration_tests::postgres_broker::PgTables;
use integration_tests::rabbitmq_broker::RabbitQueues;
use integration_tests::redis_broker::RedisStreams;
use integration_tests::sqs_broker::SqsQueues;

#[tokio::test(flavor = "multi_thread")]
async fn redis_admin_api() {
    admin_api_lists_replays_and_purges(&RedisStreams::new()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn nats_admin_api() {
    admin_api_lists_replays_and_purges(&JetStreamTopics::new().await).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sqs_admin_api() {
    admin_api_lists_replays_and_purges(&SqsQueues::new()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rabbitmq_admin_api() {
    admin_api_lists_replays_and_purges(&RabbitQueues::new()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_admin_api() {
    admin_api_lists_replays_and_purges(&PgTables::new()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_admin_api() {
    admin_api_lists_replays_and_purges(&KafkaTopics::new()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn mqtt_admin_api() {
    admin_api_lists_replays_and_purges(&MqttTopics::new()).await;
}
